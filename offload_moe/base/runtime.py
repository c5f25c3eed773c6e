"""The bottom layer's runtime helpers: devices, dtypes, byte sizes, the machine's free memory, and
the progress callback type. Every other layer imports these from here; this module imports only
`errors` (and torch), so it can sit under everything.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from fractions import Fraction
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import OffloadMoeError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DEMO_DIR = Path(__file__).parent.parent / "demo"

Progress = Callable[[str, int, int], None]  # (what, done, total)


# ---- devices and dtypes ----

HUGE_PAGE = 2 << 20


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """torch.empty(shape, dtype) on the CPU, in anonymous memory that asks for transparent huge pages
    (MADV_HUGEPAGE), its start 2 MB-aligned: for the buffers a decode step streams through every token
    (an expert cache's slots), which then take far fewer TLB misses (BENCHMARKS.md, "Huge pages for
    the mapped weights"). Small buffers, platforms without madvise and `OFFLOAD_MOE_HUGEPAGES=0`: plain
    torch.empty."""
    n = math.prod(shape) * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or n < HUGE_PAGE or os.environ.get("OFFLOAD_MOE_HUGEPAGES", "1") == "0":
        return torch.empty(shape, dtype=dtype)
    m = mmap.mmap(-1, n + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # private: shared memory gets no THP
    try:
        m.madvise(advice)
    except OSError:  # no transparent huge pages: plain pages, still a fine buffer
        pass
    start = np.frombuffer(m, dtype=np.uint8, count=1).ctypes.data
    arr = np.frombuffer(m, dtype=np.uint8, count=n, offset=(-start) % HUGE_PAGE)   # keeps the mapping alive
    return torch.from_numpy(arr).view(dtype).view(shape)


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise OffloadMoeError(f"device {device!r} is not a device name (expected auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadMoeError(f"device {str(device)!r}: CUDA is not available on this machine")
    return device


def resolve_dtype(dtype, checkpoint_dtype: str) -> torch.dtype:
    if dtype is None:
        return DTYPES[checkpoint_dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise OffloadMoeError(f"dtype {dtype!r} is not supported (expected one of {', '.join(DTYPES)})")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def place(weight, device: torch.device, dtype: torch.dtype):
    """Float weights move and take the compute dtype; packed ones only move (never inflated)."""
    if isinstance(weight, torch.Tensor):
        return weight.to(device=device, dtype=dtype)
    return weight.to(device)


def demo_dir() -> Path:
    """The bundled demo checkpoint, or a one-line error when this install has none."""
    if not (DEMO_DIR / "config.json").exists():
        raise OffloadMoeError(f"{DEMO_DIR}: the bundled demo model is missing (a source checkout without "
                              "offload_moe/demo?); give a checkpoint directory")
    return DEMO_DIR


# ---- byte sizes ----

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*$")


MAX_BYTES = 2**63  # sizes at or past this are typos: refused before any float arithmetic overflows


class SizeError(ValueError):
    """What a size parser expected; the caller adds the file or key that held the value."""


def size_in_bytes(value: Any) -> int:
    """'12GB' -> 12_000_000_000, '512MiB' -> 536_870_912, 1024 -> 1024 (GB = 1e9, GiB = 2**30).
    Raises `SizeError` saying what was expected."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.match(value) if isinstance(value, str) else None
        if m is None or m.group(2).lower() not in _UNITS:
            raise SizeError("a size such as '12GB', '512MiB' or a byte count")
        n = round(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])  # exact: 400 nines are no OverflowError
    if n < 0:
        raise SizeError("a size that is not negative")
    if n >= MAX_BYTES:
        raise SizeError("a size below 2**63 bytes (9.2 EB)")
    return n


def parse_bytes(value: int | str, what: str = "size") -> int:
    """`size_in_bytes` with a one-line user error naming `what` held the value."""
    try:
        return size_in_bytes(value)
    except SizeError as e:
        raise OffloadMoeError(f"{what} {value!r}: expected {e}") from None


def fmt_count(n: float) -> str:
    """Parameter counts as `info` and `plan` show them: 6.54M, 46.70B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def fmt_bytes(n: float) -> str:
    """Decimal units, as disks and GPU spec sheets count: 1 GB = 1e9 bytes."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# ---- the machine ----

def free_vram() -> int:
    """Free bytes on the current CUDA device, 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0
    free, _total = torch.cuda.mem_get_info()
    return free


def available_ram(*, meminfo: str | Path = "/proc/meminfo", self_cgroup: str | Path = "/proc/self/cgroup",
                  cgroup_root: str | Path = "/sys/fs/cgroup", self_status: str | Path = "/proc/self/status") -> int:
    """Host RAM this process can still take without swapping or meeting the OOM killer: the
    machine's MemAvailable (else its free pages), and where a memory cgroup limits the process (v1
    or v2; its own or an ancestor's, as a container or `systemd-run -p MemoryMax=` sets) at most
    that limit minus the cgroup's usage, and under an address-space limit (`ulimit -v`) at most
    what is left of it. 0 means unknown. The paths are parameters for tests."""
    ram = _meminfo_available(meminfo)
    for room in (cgroup_room(self_cgroup, cgroup_root), address_space_room(self_status)):
        if room is not None:
            room = max(room, 1)  # a full limit still says "known, and nothing fits" (0 would mean unknown)
            ram = min(ram, room) if ram else room
    return ram


def address_space_room(self_status: str | Path = "/proc/self/status") -> int | None:
    """Bytes of address space left under RLIMIT_AS (`ulimit -v`); None without such a limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open(self_status) as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (ImportError, OSError, ValueError, StopIteration):
        return None
    return soft - mapped


def _meminfo_available(meminfo) -> int:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


# v1 and v2 name the same three facts differently: (limit, usage, reclaimable page cache in memory.stat)
_CGROUP_FILES = {"v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
                 "v2": ("memory.max", "memory.current", "inactive_file")}
_NO_LIMIT = 2**62  # v1 writes "no limit" as a page-rounded 2**63 - 1


def cgroup_room(self_cgroup: str | Path = "/proc/self/cgroup", cgroup_root: str | Path = "/sys/fs/cgroup") -> int | None:
    """Bytes left under the tightest memory cgroup limit over this process (None: no limit, or no
    cgroup files). Usage counts without the inactive page cache the kernel reclaims before it
    OOM-kills (as `docker stats` does), so a mapped checkpoint's cached pages do not count."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            base, files = Path(cgroup_root), _CGROUP_FILES["v2"]
        elif "memory" in controllers.split(","):
            base, files = Path(cgroup_root) / "memory", _CGROUP_FILES["v1"]
        else:
            continue
        for d in _cgroup_dirs(base, path):
            limit, usage = _read_int(d / files[0]), _read_int(d / files[1])
            if limit is None or limit >= _NO_LIMIT or usage is None:
                continue
            inactive = _stat_value(d / "memory.stat", files[2])
            rooms.append(limit - max(usage - inactive, 0))
    return min(rooms) if rooms else None


def _cgroup_dirs(base: Path, path: str) -> list[Path]:
    """The cgroup's directory and its ancestors' under the mount (leaf first); inside a cgroup
    namespace the mount's root is the process's own cgroup."""
    rel = Path(path.strip().lstrip("/"))
    dirs = [base / p for p in (rel, *rel.parents)]
    return [d for d in dirs if d.is_dir()]


def _read_int(file: Path) -> int | None:
    try:
        return int(file.read_text().split()[0])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None  # absent, or "max" (v2: no limit)


def _stat_value(file: Path, key: str) -> int:
    try:
        for line in file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return 0
