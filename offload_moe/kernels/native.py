"""Our C kernels: built with the package for every instruction set, the best picked at run time,
loaded with ctypes into torch's OpenMP runtime.

Why: the fastest CPU product for packed weights needs instructions torch does not use for them
(int8 dot products: AVX-512 VNNI, AVX2, NEON dotprod), so small C files (`qmv.c`; `ggml_mv.c` for
GGUF's block layouts; `bf16mv.c`, `decode.c`, next to them any new one) ship with the package.
Building the wheel (or an editable install) compiles them into one library per variant of the
machine's architecture (`kernel_build.py`: kernels_avx512bf16.so, kernels_avx512.so,
kernels_avx2.so, kernels_portable.so on x86-64; kernels_neon-dotprod.so and
kernels_aarch64-portable.so on aarch64), as llama.cpp's GGML_CPU_ALL_VARIANTS does, so the user
needs no compiler. At first use the best variant this CPU runs is loaded (`OFFLOAD_MOE_ISA=<variant>`
forces one; `OFFLOAD_MOE_ISA=native` builds one with `-march=native` into
`$XDG_CACHE_HOME/offload-moe/kernels/`, the opt-in rebuild). A library records the hash of the
sources it was built from: where the package's sources differ (an editable install whose .c files
were edited) the variant is rebuilt into that cache with the compiler found as `$CC` or `cc`, or,
without one, the installed build is used and a warning says so.

One OpenMP runtime: the libraries are linked without one, and torch's (the one already mapped in
the process) is made global before ours is loaded, so our parallel regions use torch's pool and
torch.set_num_threads; callers pass torch.get_num_threads().

The boundary: every entry point's argument and return types are declared once, in LIBRARIES; the
fixed arguments of the `*_p` entry points are ctypes.Structure types mirroring kernel_args.h.

A fallback (no library for this CPU, a failed load, `OFFLOAD_MOE_NATIVE=0`): `load()` returns None,
`status()` says why, a warning says it once, and callers use torch's kernels. Bottom layer:
imports nothing of offload_moe but its sibling kernel_build (standard library only).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from . import kernel_build

HERE = Path(__file__).parent
SOURCE = HERE / "qmv.c"
INCLUDE = HERE                                               # kernel_common.h, kernel_args.h
BF16_SOURCE = HERE / "bf16mv.c"                              # bf16 weights (cpu_bf16.py)
GGML_SOURCE = HERE / "ggml_mv.c"                             # ggml block layouts in place (ggml.py)
PUBLISHED_SOURCE = HERE / "published_mv.c"                   # pre-quantized checkpoints' layouts (published.py)
DECODE_SOURCE = HERE / "decode.c"                            # a decode step's small ops (decode_step.py)
FLAGS = kernel_build.NATIVE                                  # the opt-in -march=native build
PATHS = {3: "NEON dotprod", 2: "AVX-512 VNNI", 1: "AVX2", 0: "portable C"}
BF16_PATHS = {2: "AVX-512 BF16", 1: "AVX2", 0: "portable C"}

_status: dict[str, str] = {}
_warned: set[str] = set()


class KernelWarning(UserWarning):
    """Our C kernels are not what the package ships for this CPU (a fallback, a rebuild, a stale build)."""


def _say_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, KernelWarning, stacklevel=3)


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


def cpu_features() -> set[str] | None:
    """This CPU's feature flags as /proc/cpuinfo names them, or None where they are unknown."""
    line = _cpu_flags()
    if ":" in line:
        return set(line.split(":", 1)[1].split())
    if sys.platform == "darwin" and kernel_build.machine() == "aarch64":   # Apple Silicon: sysctl says
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return {"asimd", "asimddp"} if out == "1" else {"asimd"}
    return None


def _compiler() -> str | None:
    return kernel_build.compiler()


def build(source: Path | list[Path] | None = None, flags: tuple[str, ...] = FLAGS, directory: Path | None = None,
          variant: str = "native") -> Path:
    """The cached shared library of `source` (default: every kernel source) built with `flags`
    (built now if missing): the JIT builder behind a stale editable install and
    OFFLOAD_MOE_ISA=native. Named by a hash of the sources, flags, compiler version and CPU flags,
    written atomically. Raises RuntimeError with the compiler's message when it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC') or 'cc'!r} not found)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from None
    files = kernel_build.sources() if source is None else [source] if isinstance(source, Path) else list(source)
    digest = kernel_build.source_hash(files + kernel_build.headers())
    key = hashlib.sha256("\0".join([digest, *flags, version, _cpu_flags()]).encode()).hexdigest()[:16]
    directory = Path(directory) if directory is not None else cache_dir()
    stem = files[0].stem if len(files) == 1 else f"kernels_{variant}"
    target = directory / f"{stem}-{key}.so"
    if target.exists():
        return target
    return kernel_build.compile_library(target, flags, variant, cc, files)


@functools.cache
def _openmp_runtime() -> str:
    """Make the OpenMP runtime torch uses global, so our libraries (linked without one) bind to it:
    the one mapped in this process, else torch's bundled copy, else the system's. Its path."""
    torch.get_num_threads()   # torch and its runtime are loaded
    found: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            found = sorted({line.split()[-1] for line in f if re.search(r"/lib(gomp|iomp5|omp)[-.][^/]*$", line)})
    except OSError:
        pass
    torch_lib = Path(torch.__file__).parent / "lib"
    found += [str(p) for pattern in ("libgomp*.so*", "libiomp5*", "libomp*") for p in sorted(torch_lib.glob(pattern))]
    for candidate in [*found, "libgomp.so.1"]:
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            return candidate
        except OSError:
            continue
    raise OSError("no OpenMP runtime found (torch's nor the system's libgomp.so.1)")


P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class QmvArgs(ctypes.Structure):          # kernel_args.h, field for field
    _fields_ = [("out_features", I64), ("in_features", I64), ("codes", P), ("scales", P), ("zeros", P),
                ("group", I64), ("bits", ctypes.c_int32)]


class QmvManyArgs(ctypes.Structure):
    _fields_ = [("in_features", I64), ("count", ctypes.c_int32), ("outs", P), ("codes", P), ("scales", P),
                ("zeros", P), ("group", I64), ("bits", ctypes.c_int32)]


class QmvSwigluArgs(ctypes.Structure):
    _fields_ = [("hidden", I64), ("inter", I64), ("c1", P), ("s1", P), ("z1", P), ("c3", P), ("s3", P), ("z3", P),
                ("group13", I64), ("bits13", ctypes.c_int32), ("c2", P), ("s2", P), ("z2", P), ("group2", I64),
                ("bits2", ctypes.c_int32)]


class BmvSwigluArgs(ctypes.Structure):
    _fields_ = [("hidden", I64), ("inter", I64), ("w1", P), ("w3", P), ("w2", P)]


class GgmlArgs(ctypes.Structure):
    _fields_ = [("out_features", I64), ("in_features", I64), ("data", P), ("type", ctypes.c_int32)]


class GgmlManyArgs(ctypes.Structure):
    _fields_ = [("in_features", I64), ("count", ctypes.c_int32), ("outs", P), ("datas", P), ("type", ctypes.c_int32)]


class GgmlSwigluArgs(ctypes.Structure):
    _fields_ = [("hidden", I64), ("inter", I64), ("w1", P), ("w3", P), ("t13", ctypes.c_int32), ("w2", P),
                ("t2", ctypes.c_int32)]


class PqFp8Args(ctypes.Structure):
    _fields_ = [("n", I64), ("k", I64), ("w", P), ("scale", P), ("bn", I64), ("bk", I64)]


class PqIntArgs(ctypes.Structure):
    _fields_ = [("n", I64), ("k", I64), ("q", P), ("scale", P), ("s_dtype", I64), ("zp", P), ("group", I64),
                ("bits", I64), ("g_idx", P), ("groups", I64)]


class PqGptqArgs(ctypes.Structure):
    _fields_ = [("n", I64), ("k", I64), ("qw", P), ("qz", P), ("scales", P), ("s_dtype", I64), ("g_idx", P),
                ("groups", I64), ("bits", I64), ("zero_offset", I64), ("order", P)]


class LayerFrontArgs(ctypes.Structure):   # layer_front (decode_layer.c): a layer's attention half and router
    _fields_ = [("hidden", I64), ("norm1", P), ("norm2", P), ("norm_dtype", I32), ("half_scale", I32), ("eps", F32),
                ("qkv_call", P), ("qkv_args", P), ("q_width", I64), ("kv_width", I64), ("o_call", P), ("o_args", P),
                ("q_norm", P), ("k_norm", P), ("qk_norm_dtype", I32), ("qk_norm_mode", I32), ("qk_norm_eps", F32),
                ("clip", F32), ("sinks", P), ("sinks_dtype", I32), ("rope_pairs", I32), ("window", I64), ("nh", I64),
                ("nkv", I64), ("hd", I64), ("scale", F32), ("gate", P), ("gate_bias", P), ("gate_dtype", I32),
                ("gate_bias_dtype", I32), ("experts", I64), ("k", I32), ("rule", I32), ("norm_topk", I32),
                ("round_logits", I32), ("scaling", F32)]


class ExpertTableArgs(ctypes.Structure):   # layer_step (decode_layer.c): a layer's stacked ggml experts
    _fields_ = [("call", P), ("w1", P), ("w3", P), ("w2", P), ("s1", I64), ("s3", I64), ("s2", I64), ("t13", I32),
                ("t2", I32), ("hidden", I64), ("inter", I64), ("experts", I64)]


class LayerStackArgs(ctypes.Structure):   # layers_step (decode_layer.c): one layer of the stack
    _fields_ = [("front", ctypes.POINTER(LayerFrontArgs)), ("table", ctypes.POINTER(ExpertTableArgs)), ("kc", P),
                ("vc", P), ("cache_dtype", I32), ("slot_stride", I64), ("max_seq", I64)]


ARG_STRUCTS = {s.__name__: s for s in (QmvArgs, QmvManyArgs, QmvSwigluArgs, BmvSwigluArgs, GgmlArgs, GgmlManyArgs,
                                       GgmlSwigluArgs, PqFp8Args, PqIntArgs, PqGptqArgs, LayerFrontArgs,
                                       ExpertTableArgs, LayerStackArgs)}


def _p(args: type[ctypes.Structure]) -> list:
    """The argument types of a `*_p` entry point: x, x dtype, y, y dtype, N, its struct, threads."""
    return [P, I32, P, I32, I64, ctypes.POINTER(args), I32]


def arg_block(*values: int) -> tuple[ctypes.Array, int]:
    """Untyped int64 blocks, kept only for entry points not yet given a struct in kernel_args.h
    (new ones should get one): (the block, kept alive by the caller, and its address to pass)."""
    block = (ctypes.c_int64 * len(values))(*values)
    return block, ctypes.addressof(block)


# each library: (source, {function: (return type, argument types)}, its instruction-path function or None).
# Every source is compiled into the one library of a variant; a name here only says which functions
# a caller uses (and declares them).
LIBRARIES = {
    "qmv": (SOURCE, {
        "qmv_path": (I32, []),
        "qmv_supported": (I32, [I64, I64, I32]),
        "qmv": (I32, [P, I32, P, I32, I64, I64, I64, P, P, P, I64, I32, I32]),
        "qmv_many": (I32, [P, I32, P, I32, I64, I64, I32, P, P, P, P, I64, I32, I32]),
        "qmv_swiglu": (I32, [P, I32, P, I32, I64, I64, I64, P, P, P, P, P, P, I64, I32, P, P, P, I64, I32, I32]),
        "qmv_p": (I32, _p(QmvArgs)),
        "qmv_many_p": (I32, _p(QmvManyArgs)),
        "qmv_swiglu_p": (I32, _p(QmvSwigluArgs)),
    }, "qmv_path"),
    "bmv": (BF16_SOURCE, {
        "bmv_path": (I32, []),
        "bmv": (I32, [P, P, I32, I64, I64, I64, P, I32]),
        "bmv_swiglu": (I32, [P, P, I32, I64, I64, I64, P, P, P, I32]),
        "bmv_swiglu_p": (I32, [P, P, I32, I64, ctypes.POINTER(BmvSwigluArgs), I32]),
    }, "bmv_path"),
    "ggml": (GGML_SOURCE, {
        "ggml_path": (I32, []),
        "ggml_supported": (I32, [I32, I64]),
        "ggml_mv": (I32, [P, I32, P, I32, I64, I64, I64, P, I32, I32]),
        "ggml_mv_many": (I32, [P, I32, P, I32, I64, I64, I32, P, P, I32, I32]),
        "ggml_swiglu": (I32, [P, I32, P, I32, I64, I64, I64, P, P, I32, P, I32, I32]),
        "ggml_rows": (I32, [P, I32, I64, P, I64, P, I32]),
        "ggml_mv_p": (I32, _p(GgmlArgs)),
        "ggml_mv_many_p": (I32, _p(GgmlManyArgs)),
        "ggml_swiglu_p": (I32, _p(GgmlSwigluArgs)),
        "ggml_experts": (I32, [P, I32, P, I32, I32, P, I32]),   # k pointers to GgmlSwigluArgs
    }, "ggml_path"),
    "published": (PUBLISHED_SOURCE, {
        "pq_path": (I32, []),
        "pq_fp8_p": (I32, _p(PqFp8Args)),
        "pq_int_p": (I32, _p(PqIntArgs)),
        "pq_gptq_p": (I32, _p(PqGptqArgs)),
    }, "pq_path"),
    "decode": (DECODE_SOURCE, {
        "rms_norm_rows": (I32, [P, I32, I64, P, I32, I64, I64, F32, I32, P, I32]),
        "attn_decode_rows": (I32, [P, P, P, I32, I64, I64, P, P, I32, I64, I32, P, P, I32, I32, F32, F32, P, I32, P, P, I32,
                                   I64, I64, P, P, I64, I64, I64, I64, I64, F32, P, I32, I32]),
        "route_rows": (I32, [P, I32, I64, P, I32, P, I32, I64, I64, I32, I32, I32, F32, I32, I64, P, P, I32, I32]),
        "moe_expert_rows": (I32, [P, I32, I64, I64, I64, I32, P, I64, P, P, P, I32]),
        "moe_experts_rows": (I32, [P, I32, I64, I64, I64, I32, P, I64, P, P, P, P, I32]),
        "moe_combine": (I32, [P, I32, P, I32, I64, I32, I64, P]),
        "layer_front": (I32, [ctypes.POINTER(LayerFrontArgs), P, I32, I64, P, P, I32, I64, P, P, I32, I64, I64, P, P,
                              P, P, P, P, I32]),
        "layer_step": (I32, [ctypes.POINTER(LayerFrontArgs), ctypes.POINTER(ExpertTableArgs), P, I32, I64, P, P, I32,
                             I64, P, P, I32, I64, I64, P, P, P, P, I32]),
        "layers_step": (I32, [P, I32, P, I32, I64, P, P, I32, I64, P, P, P, I32]),
    }, None),
    "info": (HERE / "kernels_info.c", {
        "kernels_variant": (ctypes.c_char_p, []),
        "kernels_source_hash": (ctypes.c_char_p, []),
        "kernels_team": (I32, [I32]),
    }, None),
}


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


def call_rows(call, at: ctypes.Structure | int, xs: torch.Tensor, out_features: int, what: str) -> torch.Tensor:
    """(N, I) contiguous fp32 or bf16 -> (N, out_features) in its dtype through a kernel entry point
    `call(x, x dtype, y, y dtype, N, fixed arguments, threads)` (the `*_p` calls; `at` their struct
    of fixed arguments, e.g. a `QmvArgs`, passed by reference). `what` names the call and its weight
    in the one-line error of a refused call."""
    n = xs.shape[0]
    y = torch.empty(n, out_features, dtype=xs.dtype)                                   # (N, out)
    code = DTYPE_CODES[xs.dtype]
    rc = call(xs.data_ptr(), code, y.data_ptr(), code, n, at, torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"{what}: no scratch for {n} tokens") if rc == -1 else \
            ValueError(f"{what}: the kernel refused {n} tokens")
    return y


def entry_point(call, at: ctypes.Structure, limit: int) -> tuple[int, int, int]:
    """A `*_p` call as C code takes it: (the function's address, its fixed arguments' address, the
    token count from which the caller computes another way). The struct must outlive the caller's use."""
    return ctypes.cast(call, ctypes.c_void_p).value, ctypes.addressof(at), limit


def open_library(path: Path, name: str | None = None) -> ctypes.CDLL:
    """Load a built library into torch's OpenMP runtime and declare the signatures of library
    `name`'s functions (None: every library's)."""
    _openmp_runtime()
    lib = ctypes.CDLL(str(path))
    for library in LIBRARIES if name is None else ("info", name):
        for function, (restype, argtypes) in LIBRARIES[library][1].items():
            f = getattr(lib, function, None)
            if f is not None:          # a library built before the function existed lacks it
                f.restype, f.argtypes = restype, argtypes
    return lib


def packaged(variant: str) -> Path:
    """Where the package's build of `variant` lies (setup.py puts it next to this file)."""
    return HERE / kernel_build.library_name(variant)


def best_variant(features: set[str] | None = None, arch: str | None = None) -> tuple[str | None, str]:
    """The best variant this CPU runs and why it is not a better one ("" when it is the best built)."""
    arch = arch or kernel_build.machine()
    names = kernel_build.variants_for(arch)
    if not names:
        return None, f"no kernels for the {arch} architecture"
    features = cpu_features() if features is None else features
    if features is None:
        return names[-1], "this CPU's features are unknown: the portable build"
    for name in names:
        if kernel_build.VARIANTS[name][2] <= features:
            return name, ""
    return names[-1], ""


def _chosen() -> tuple[str | None, str]:
    """(variant, why it is not the automatic choice or "") from OFFLOAD_MOE_ISA and the CPU."""
    forced = os.environ.get("OFFLOAD_MOE_ISA", "").strip()
    best, why = best_variant()
    if not forced or forced == "native":
        return (forced or best), why
    names = kernel_build.variants_for(kernel_build.machine())
    if forced not in names:
        return best, f"OFFLOAD_MOE_ISA={forced!r} is not one of {names + ['native']}: using {best}"
    features = cpu_features()
    missing = sorted(kernel_build.VARIANTS[forced][2] - features) if features is not None else []
    if missing:
        return best, f"OFFLOAD_MOE_ISA={forced} needs CPU features this CPU lacks ({', '.join(missing)}): using {best}"
    return forced, ""


def open_variant(variant: str) -> ctypes.CDLL:
    """The library of `variant` with every function declared: the package's build, rebuilt into the
    cache where the package's sources changed since (and a compiler exists); `native` is always
    built here. Raises RuntimeError/OSError saying why it cannot be had."""
    if variant == "native":
        return open_library(build(flags=FLAGS, variant="native"))
    flags = kernel_build.VARIANTS[variant][1]
    path = packaged(variant)
    if not path.exists():
        if _compiler() is None:
            raise RuntimeError(f"the package has no {path.name} and there is no C compiler to build it")
        return open_library(build(flags=flags, variant=variant))
    lib = open_library(path)
    built = lib.kernels_source_hash().decode()
    try:
        current = kernel_build.source_hash()
    except OSError:                      # sources not shipped: trust the build
        return lib
    if built == current:
        return lib
    if _compiler() is None:
        _say_once(f"offload_moe: {path.name} was built from other kernel sources than the package's ({built} != "
                  f"{current}) and there is no C compiler to rebuild it: using it as built")
        return lib
    return open_library(build(flags=flags, variant=variant))


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str]:
    """The kernel library for this process and what it is ("kernels_avx2.so", or why there is none)."""
    if os.environ.get("OFFLOAD_MOE_NATIVE", "1") == "0":
        return None, "off (OFFLOAD_MOE_NATIVE=0)"
    variant, why = _chosen()
    if why:
        _say_once(f"offload_moe: {why}")
    if variant is None:
        _say_once(f"offload_moe: no C kernels: {why}; torch's kernels run instead")
        return None, f"unavailable: {why}"
    names = kernel_build.variants_for(kernel_build.machine())
    lower = names[names.index(variant) + 1:] if variant in names else []
    failed = []
    for candidate in [variant, *lower]:      # a variant that does not load: the next one down, said once
        try:
            lib = open_variant(candidate)
        except (RuntimeError, OSError) as e:
            failed.append(f"{candidate}: {e}")
            continue
        if failed:
            _say_once(f"offload_moe: using the {candidate} kernels ({'; '.join(failed)})")
        return lib, candidate
    _say_once(f"offload_moe: no C kernels ({'; '.join(failed)}); torch's kernels run instead")
    return None, f"unavailable: {failed[0].split(': ', 1)[1]}"


@functools.cache
def load(name: str = "qmv") -> ctypes.CDLL | None:
    """Library `name` ("qmv", "bmv", "ggml", "published", "decode"): the kernel library of this process with
    `name`'s functions, or None (see `status`)."""
    lib, what = library()
    if lib is None:
        _status[name] = what
        return None
    path_of = LIBRARIES[name][2]
    paths = BF16_PATHS if name == "bmv" else PATHS
    _status[name] = f"{paths.get(getattr(lib, path_of)(), 'unknown')}, {what}" if path_of else what
    return lib


def load_decode() -> ctypes.CDLL | None:
    """The decode-step functions (`decode.c`), or None."""
    return load("decode")


def status(name: str = "qmv") -> str:
    """What library `name` is: its instruction path and variant, or why it is not used."""
    load(name)
    return _status.get(name, "not loaded")


__all__ = ["ARG_STRUCTS", "BF16_PATHS", "BF16_SOURCE", "BmvSwigluArgs", "DECODE_SOURCE", "DTYPE_CODES", "ExpertTableArgs", "FLAGS", "LayerFrontArgs", "LayerStackArgs", "entry_point",
           "GGML_SOURCE", "GgmlArgs", "GgmlManyArgs", "GgmlSwigluArgs", "KernelWarning", "LIBRARIES", "PATHS",
           "PUBLISHED_SOURCE", "PqFp8Args", "PqGptqArgs", "PqIntArgs", "QmvArgs", "QmvManyArgs", "QmvSwigluArgs",
           "SOURCE", "arg_block", "best_variant", "build", "cache_dir", "call_rows", "cpu_features", "kernel_rows",
           "library", "load", "load_decode", "open_library", "open_variant", "packaged", "status"]
