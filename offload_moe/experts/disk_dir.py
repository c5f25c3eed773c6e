"""The disk tier's own directory and files.

Every process gets a private subdirectory `offload-moe-<pid>-<random>` (mode 0700, made by one
`mkdir`, which fails rather than follow or reuse anything already there) under the user's
`offload_dir`, or under $TMPDIR when none is given. Only files inside it are ever written, each
created with O_EXCL | O_NOFOLLOW, so nothing the user owns in `offload_dir` is read, replaced or
followed, and two processes can share one `offload_dir`. The subdirectory is removed at exit, on
SIGINT / SIGTERM / SIGHUP (`owned_paths`), and, if the process was killed outright, by the next run
that finds it (its PID is dead).

Contents are verified, not trusted: when a layer file is written, a CRC-32 of a few sampled blocks
of every expert (head, middle, tail) is kept in memory; every read of an expert checks the file's
size through the open descriptor (so a truncated file is a one-line error, not SIGBUS) and that
expert's sampled checksum (so a truncated-and-regrown file, or one rewritten with the old mtime,
is caught) — a few KiB of hashing per miss, beside the MiB the miss copies.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

from ..base import owned_paths
from ..base.errors import OffloadMoeError

PREFIX = "offload-moe-"
OURS = re.compile(r"offload-moe-(?P<pid>\d+)-[0-9a-f]{8}")
SAMPLE = 4096   # bytes per sampled block
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def sampled_crc(row: np.ndarray) -> int:
    """CRC-32 of the head, middle and tail blocks of one expert's bytes (a 1-D uint8 array)."""
    n = row.shape[0]
    crc = zlib.crc32(row[:SAMPLE])
    mid = max(0, n // 2 - SAMPLE // 2)
    crc = zlib.crc32(row[mid:mid + SAMPLE], crc)
    return zlib.crc32(row[max(0, n - SAMPLE):], crc)


def _remove_empty(dirs: list[Path]) -> None:
    """Remove directories this process made (deepest first), stopping at one that is not empty."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            break


class DiskDir:
    """A private directory of layer files for one process; `needed` bytes will be written."""

    def __init__(self, base: str | Path | None, needed: int):
        given = base is not None
        base = Path(base) if given else Path(tempfile.gettempdir())
        shown = f"offload_dir {str(base)!r}" if given else f"$TMPDIR {str(base)!r}"
        made = [d for d in (base, *base.parents) if not os.path.lexists(d)] if given else []  # deepest first
        if made:
            try:
                base.mkdir(parents=True)
            except OSError as e:
                _remove_empty(made)
                raise OffloadMoeError(f"{shown} cannot be created ({e.strerror})") from None
        if not base.is_dir():
            raise OffloadMoeError(f"{shown} is not writable (not a directory)")
        owned_paths.remove_stale(base, OURS)  # left by runs that were killed outright
        try:
            free = shutil.disk_usage(base).free
        except OSError:
            free = None
        if free is not None and free < needed:
            _remove_empty(made)  # a refused tier leaves no directory it created
            raise OffloadMoeError(f"{shown}: the disk tier needs {human(needed)} but only {human(free)} "
                                  "is free (free some space, pass --offload-dir elsewhere, or raise --ram-budget)")
        self.path = base / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(self.path, 0o700)
        except OSError as e:
            _remove_empty(made)
            raise OffloadMoeError(f"{shown} is not writable ({e.strerror})") from None
        owned_paths.own(self.path, remove_parent_if_empty=bool(made))
        self.needed, self.shown = needed, shown
        self.fds: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.crcs: dict[str, list[int]] = {}

    def file(self, name: str) -> Path:
        return self.path / name

    def write(self, name: str, rows: np.ndarray) -> Path:
        """Write one layer's (E, nbytes) uint8 array to a new file of ours; remember its checksums."""
        path = self.file(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o600)
            try:
                view = memoryview(np.ascontiguousarray(rows)).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            self.fds[name] = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            self.remove()
            if e.errno in FULL_DISK:
                raise OffloadMoeError(f"{self.shown}: disk full while writing the disk tier: it needs "
                                      f"{human(self.needed)} in all (its files were removed)") from None
            raise OffloadMoeError(f"{path}: cannot write the disk tier ({e.strerror})") from None
        self.sizes[name] = rows.nbytes
        self.crcs[name] = [sampled_crc(row) for row in rows]
        return path

    def check(self, name: str, expert: int, row) -> None:
        """Before `row` (expert `expert`'s mapped bytes in file `name`) is read: still ours, intact."""
        path = self.file(name)
        try:
            size = os.fstat(self.fds[name]).st_size
        except (OSError, KeyError):
            raise OffloadMoeError(f"{path}: disk tier file cannot be checked (was it removed?)") from None
        if size < self.sizes[name]:
            raise OffloadMoeError(f"{path}: disk tier file is {size:,} bytes, expected {self.sizes[name]:,} "
                                  "(truncated after it was written)")
        if sampled_crc(row.numpy()) != self.crcs[name][expert]:
            raise OffloadMoeError(f"{path}: disk tier file changed after it was written "
                                  f"(checksum of expert {expert} differs)")

    def remove(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        owned_paths.release(self.path)
