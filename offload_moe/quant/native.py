"""Our C kernels: compiled once per machine from the bundled source, cached, loaded with ctypes.

Why: the fastest CPU product for packed weights needs instructions torch does not use for them
(int8 dot products: AVX-512 VNNI, AVX2), so a small C file (`qmv.c`) ships with the package and is
built for the CPU it runs on (`-march=native`) by the C compiler found as `$CC` or `cc`, the way
Triton and torch.compile build theirs. The library lands in `$XDG_CACHE_HOME/offload-moe/kernels/`
(default `~/.cache/...`) under a name that hashes the source, the flags, the compiler's version
and the CPU's feature flags, so a changed source, compiler or machine (a shared home directory)
gets its own build; it is written to a private temporary file and renamed into place, so two
processes building at once never see half a library, and a failed build leaves nothing behind
(a build killed outright leaves a hidden partial file, removed by a later build).

No compiler, a failed build, or `OFFLOAD_MOE_NATIVE=0`: `load()` returns None and says why in
`status()`, and callers use torch's kernels. Bottom layer: imports nothing of offload_moe.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("qmv.c")
DECODE_SOURCE = Path(__file__).parent.parent / "decode.c"   # a decode step's small ops (decode_cpu.py)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
PATHS = {2: "AVX-512 VNNI", 1: "AVX2", 0: "portable C"}
BUILD_TIMEOUT_S = 120

_status: dict[str, str] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "offload-moe" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def build(source: Path = SOURCE, flags: tuple[str, ...] = FLAGS, directory: Path | None = None) -> Path:
    """The cached shared library for `source` built with `flags` (built now if missing). Raises
    RuntimeError with the compiler's message when it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not found)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from None
    key = hashlib.sha256("\0".join([source.read_text(), *flags, version, _cpu_flags()]).encode()).hexdigest()[:16]
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(directory, source.stem)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            raise RuntimeError(f"{cc} could not build {source.name}: {first}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: another process sees no library or a whole one
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{cc} took over {BUILD_TIMEOUT_S} s to build {source.name}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _remove_stale_partials(directory: Path, stem: str, age_s: float = 600.0) -> None:
    """Half-written libraries of builds killed outright (older than any build takes)."""
    for partial in directory.glob(f".{stem}-*.so"):
        try:
            if time.time() - partial.stat().st_mtime > age_s:
                partial.unlink()
        except OSError:
            pass


def open_library(path: Path) -> ctypes.CDLL:
    torch.get_num_threads()  # torch (and its OpenMP runtime) is loaded first: the library shares it
    lib = ctypes.CDLL(str(path))
    lib.qmv_path.restype = ctypes.c_int
    lib.qmv_supported.restype = ctypes.c_int
    lib.qmv_supported.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.qmv.restype = ctypes.c_int
    lib.qmv.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                        ctypes.c_int]
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qmv_swiglu.restype = I32
    lib.qmv_many.restype = I32
    lib.qmv_many.argtypes = [P, I32, P, I32, I64, I64, I32, P, P, P, P, I64, I32, I32]
    lib.qmv_swiglu.argtypes = [P, I32, P, I32, I64, I64, I64, P, P, P, P, P, P, I64, I32, P, P, P, I64, I32, I32]
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library built for this machine, or None (see `status`)."""
    if os.environ.get("OFFLOAD_MOE_NATIVE", "1") == "0":
        _status["qmv"] = "off (OFFLOAD_MOE_NATIVE=0)"
        return None
    try:
        lib = open_library(build())
    except (RuntimeError, OSError) as e:
        _status["qmv"] = f"unavailable: {e}"
        return None
    _status["qmv"] = PATHS.get(lib.qmv_path(), "unknown")
    return lib


def open_decode_library(path: Path) -> ctypes.CDLL:
    torch.get_num_threads()
    lib = ctypes.CDLL(str(path))
    P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.rms_norm_row.restype = lib.attn_decode.restype = lib.route_one.restype = I32
    lib.rms_norm_row.argtypes = [P, I32, P, I32, I64, F32, I32, P, I32]
    lib.attn_decode.argtypes = [P, P, P, I32, P, P, I32, P, P, I32, I32, F32, F32, P, I32, P, P, I32, I64, I64, I64,
                                I64, I64, I64, F32, P, I32, I32]
    lib.route_one.argtypes = [P, I32, P, I32, P, I32, I64, I64, I32, I32, I32, F32, I32, P, P, I32]
    return lib


@functools.cache
def load_decode() -> ctypes.CDLL | None:
    """The decode-step library (`decode.c`) built for this machine, or None (see `status("decode")`)."""
    if os.environ.get("OFFLOAD_MOE_NATIVE", "1") == "0":
        _status["decode"] = "off (OFFLOAD_MOE_NATIVE=0)"
        return None
    try:
        lib = open_decode_library(build(DECODE_SOURCE))
    except (RuntimeError, OSError) as e:
        _status["decode"] = f"unavailable: {e}"
        return None
    _status["decode"] = "built"
    return lib


def status() -> str:
    """What the kernel library is: its instruction path, or why it is not used."""
    load()
    return _status.get("qmv", "not loaded")


__all__ = ["DECODE_SOURCE", "FLAGS", "PATHS", "SOURCE", "build", "cache_dir", "load", "load_decode", "open_decode_library",
           "open_library", "status"]
