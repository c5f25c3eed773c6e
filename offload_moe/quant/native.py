"""Our C kernels: compiled once per machine from the bundled source, cached, loaded with ctypes.

Why: the fastest CPU product for packed weights needs instructions torch does not use for them
(int8 dot products: AVX-512 VNNI, AVX2), so small C files (`qmv.c`; `ggml_mv.c` for GGUF's block
layouts; `bf16mv.c`, `decode.c`) ship with the package and are built for the CPU they run on
(`-march=native`) by the C compiler found as `$CC` or `cc`, the way Triton and torch.compile build
theirs. The library lands in `$XDG_CACHE_HOME/offload-moe/kernels/`
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
INCLUDE = Path(__file__).parent                                # kernel_common.h, shared by the sources
BF16_SOURCE = Path(__file__).with_name("bf16mv.c")           # bf16 weights (cpu_bf16.py)
GGML_SOURCE = Path(__file__).with_name("ggml_mv.c")          # ggml block layouts in place (ggml.py)
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
    headers = [h.read_text() for h in sorted(INCLUDE.glob("*.h"))]   # what the sources #include
    key = hashlib.sha256("\0".join([source.read_text(), *headers, *flags, version, _cpu_flags()]).encode()).hexdigest()[:16]
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(directory, source.stem)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, f"-I{INCLUDE}", str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
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


P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def arg_block(*values: int) -> tuple[ctypes.Array, int]:
    """Fixed arguments of a `*_p` entry point as one int64 block: (the block, kept alive by the
    caller, and its address to pass)."""
    block = (ctypes.c_int64 * len(values))(*values)
    return block, ctypes.addressof(block)

# each library: (source, {function: (return type, argument types)}, its instruction-path function or None)
LIBRARIES = {
    "qmv": (SOURCE, {
        "qmv_path": (I32, []),
        "qmv_supported": (I32, [I64, I64, I32]),
        "qmv": (I32, [P, I32, P, I32, I64, I64, I64, P, P, P, I64, I32, I32]),
        "qmv_many": (I32, [P, I32, P, I32, I64, I64, I32, P, P, P, P, I64, I32, I32]),
        "qmv_swiglu": (I32, [P, I32, P, I32, I64, I64, I64, P, P, P, P, P, P, I64, I32, P, P, P, I64, I32, I32]),
        "qmv_p": (I32, [P, I32, P, I32, I64, P, I32]),
        "qmv_many_p": (I32, [P, I32, P, I32, I64, P, I32]),
        "qmv_swiglu_p": (I32, [P, I32, P, I32, I64, P, I32]),
    }, "qmv_path"),
    "bmv": (BF16_SOURCE, {
        "bmv_path": (I32, []),
        "bmv": (I32, [P, P, I32, I64, I64, I64, P, I32]),
        "bmv_swiglu": (I32, [P, P, I32, I64, I64, I64, P, P, P, I32]),
        "bmv_swiglu_p": (I32, [P, P, I32, I64, P, I32]),
    }, "bmv_path"),
    "ggml": (GGML_SOURCE, {
        "ggml_path": (I32, []),
        "ggml_supported": (I32, [I32, I64]),
        "ggml_mv": (I32, [P, I32, P, I32, I64, I64, I64, P, I32, I32]),
        "ggml_mv_many": (I32, [P, I32, P, I32, I64, I64, I32, P, P, I32, I32]),
        "ggml_swiglu": (I32, [P, I32, P, I32, I64, I64, I64, P, P, I32, P, I32, I32]),
        "ggml_rows": (I32, [P, I32, I64, P, I64, P, I32]),
        "ggml_mv_p": (I32, [P, I32, P, I32, I64, P, I32]),
        "ggml_mv_many_p": (I32, [P, I32, P, I32, I64, P, I32]),
        "ggml_swiglu_p": (I32, [P, I32, P, I32, I64, P, I32]),
        "ggml_experts": (I32, [P, I32, P, I32, I32, P, I32]),
    }, "ggml_path"),
    "decode": (DECODE_SOURCE, {
        "rms_norm_row": (I32, [P, I32, P, I32, I64, F32, I32, P, I32]),
        "attn_decode": (I32, [P, P, P, I32, P, P, I32, P, P, I32, I32, F32, F32, P, I32, P, P, I32, I64, I64, I64,
                              I64, I64, I64, F32, P, I32, I32]),
        "route_one": (I32, [P, I32, P, I32, P, I32, I64, I64, I32, I32, I32, F32, I32, P, P, I32]),
    }, None),
}
BF16_PATHS = {2: "AVX-512 BF16", 1: "AVX2", 0: "portable C"}


DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}   # the activation dtypes our kernels take, by code


def kernel_rows(x: torch.Tensor, in_features: int, dense_from: int) -> torch.Tensor | None:
    """x [..., I] as the contiguous (N, I) rows a kernel call takes, or None where it does not take
    them: another dtype or device, or N >= `dense_from` (a dense product on dequantized rows wins)."""
    if x.dtype not in DTYPE_CODES or x.device.type != "cpu":
        return None
    xs = x.reshape(-1, in_features)                                                    # (N, I)
    if xs.shape[0] >= dense_from:
        return None
    return xs if xs.is_contiguous() else xs.contiguous()


def call_rows(call, at: int, xs: torch.Tensor, out_features: int, what: str) -> torch.Tensor:
    """(N, I) contiguous fp32 or bf16 -> (N, out_features) in its dtype through a kernel entry point
    `call(x, x dtype, y, y dtype, N, fixed arguments, threads)` (the `*_p` calls; `at` from
    `arg_block`). `what` names the call and its weight in the one-line error of a refused call."""
    n = xs.shape[0]
    y = torch.empty(n, out_features, dtype=xs.dtype)                                   # (N, out)
    code = DTYPE_CODES[xs.dtype]
    rc = call(xs.data_ptr(), code, y.data_ptr(), code, n, at, torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"{what}: no scratch for {n} tokens") if rc == -1 else \
            ValueError(f"{what}: the kernel refused {n} tokens")
    return y


def open_library(path: Path, name: str = "qmv") -> ctypes.CDLL:
    """Load a built library and declare the signatures of library `name`'s functions."""
    torch.get_num_threads()  # torch (and its OpenMP runtime) is loaded first: the library shares it
    lib = ctypes.CDLL(str(path))
    for function, (restype, argtypes) in LIBRARIES[name][1].items():
        f = getattr(lib, function)
        f.restype, f.argtypes = restype, argtypes
    return lib


@functools.cache
def load(name: str = "qmv") -> ctypes.CDLL | None:
    """Library `name` ("qmv", "bmv", "ggml", "decode") built for this machine, or None (see `status`)."""
    if os.environ.get("OFFLOAD_MOE_NATIVE", "1") == "0":
        _status[name] = "off (OFFLOAD_MOE_NATIVE=0)"
        return None
    source, _, path_of = LIBRARIES[name]
    try:
        lib = open_library(build(source), name)
    except (RuntimeError, OSError) as e:
        _status[name] = f"unavailable: {e}"
        return None
    paths = BF16_PATHS if name == "bmv" else PATHS
    _status[name] = paths.get(getattr(lib, path_of)(), "unknown") if path_of else "built"
    return lib


def load_decode() -> ctypes.CDLL | None:
    """The decode-step library (`decode.c`), or None."""
    return load("decode")


def status(name: str = "qmv") -> str:
    """What library `name` is: its instruction path, or why it is not used."""
    load(name)
    return _status.get(name, "not loaded")


__all__ = ["arg_block", "call_rows", "kernel_rows", "DTYPE_CODES", "BF16_PATHS", "BF16_SOURCE", "DECODE_SOURCE", "GGML_SOURCE", "FLAGS", "LIBRARIES", "PATHS", "SOURCE", "build", "cache_dir",
           "load", "load_decode", "open_library", "status"]
