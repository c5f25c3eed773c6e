"""The disk tier's read bandwidth: a fresh file written, dropped from the page cache where the
filesystem allows it, and read back; and which filesystem a path is on (tmpfs reads at RAM speed)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..base.errors import OffloadMoeError

DISK_TEST_BYTES = 256 * 10**6       # the temporary file the disk read is timed on
_CHUNK = 16 * 2**20
_IN_MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs"}


def filesystem_type(path: str | Path) -> str:
    """The type of the filesystem holding `path` ('ext4', 'tmpfs', ...), from /proc/self/mounts;
    'unknown' where that is not readable."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])  # \040: space
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def measure_disk_read(nbytes: int = DISK_TEST_BYTES, directory: str | Path | None = None) -> dict:
    """Sequential read bandwidth of a fresh `nbytes` file in `directory` (default: the temp dir).

    The file is written, flushed to disk and dropped from the page cache with
    posix_fadvise(DONTNEED) before it is read back, so the read comes from the device where the
    filesystem allows it. Returns {"bytes_per_second", "bytes", "cold", "filesystem", "directory"};
    "cold" is False when the page cache could not be dropped (no fadvise, or an in-memory
    filesystem such as tmpfs), so the figure is RAM speed."""
    if nbytes < 2**20:
        raise OffloadMoeError(f"disk test size {nbytes:,} bytes: expected at least 1MiB")
    directory = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as e:
        raise OffloadMoeError(f"{directory}: cannot use it for the disk test ({e.strerror})") from None
    nbytes = int(min(nbytes, free // 4))
    if nbytes < 2**20:
        raise OffloadMoeError(f"{directory}: only {free / 1e6:.1f} MB free, too little for the disk test")
    pattern = os.urandom(min(_CHUNK, nbytes))
    fd, name = tempfile.mkstemp(prefix=".offload-moe-disktest-", dir=directory)
    cold = hasattr(os, "posix_fadvise")
    try:
        try:
            left = nbytes
            while left:
                left -= os.write(fd, pattern[:min(left, len(pattern))])
            os.fsync(fd)  # dirty pages cannot be dropped
        except OSError as e:
            raise OffloadMoeError(f"{directory}: cannot write the disk test file ({e.strerror})") from None
        if cold:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                cold = False
        os.close(fd)
        fd = -1
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        t0 = time.perf_counter()
        got = 0
        with open(name, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                got += n
        seconds = max(time.perf_counter() - t0, 1e-9)
    finally:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass
    fs = filesystem_type(directory)
    return {"bytes_per_second": got / seconds, "bytes": got, "cold": cold and fs not in _IN_MEMORY_FS,
            "filesystem": fs, "directory": str(directory)}


def measure_file_read(path: str | Path, nbytes: int = 64 * 2**20) -> dict:
    """Read rate of an existing file (a model's own), `nbytes` from its middle in expert-sized chunks
    after dropping that range from the page cache where the system allows it; nothing is written.
    Returns {"bytes_per_second", "bytes", "cold", "filesystem"}."""
    path = Path(path)
    size = path.stat().st_size
    n = min(nbytes, size)
    start = (size - n) // 2 // 4096 * 4096
    fd = os.open(path, os.O_RDONLY)
    cold = hasattr(os, "posix_fadvise")
    try:
        if cold:
            try:
                os.posix_fadvise(fd, start, n, os.POSIX_FADV_DONTNEED)
            except OSError:
                cold = False
        buf = bytearray(4 * 2**20)
        view = memoryview(buf)
        got = 0
        t0 = time.perf_counter()
        while got < n:
            k = os.preadv(fd, [view[:min(len(buf), n - got)]], start + got)
            if k <= 0:
                break
            got += k
        seconds = max(time.perf_counter() - t0, 1e-9)
    finally:
        os.close(fd)
    fs = filesystem_type(path)
    return {"bytes_per_second": got / seconds, "bytes": got, "cold": cold and fs not in _IN_MEMORY_FS,
            "filesystem": fs}
