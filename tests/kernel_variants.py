"""The instruction-set variants of our C kernels as the tests see them: every variant built for this
machine's architecture, each opened as the package ships it (quant/native.py `open_variant`), and
the instruction path each kernel file reports in it. Used by the float64-oracle kernel tests, so
each of them runs on every variant this CPU can execute (the others are skipped with a reason)."""

from __future__ import annotations

import pytest

from offload_moe.kernels import kernel_build, native

VARIANTS = kernel_build.variants_for(kernel_build.machine())

# variant -> the path each kernel's `*_path()` reports (qmv/ggml: 3 NEON dotprod, 2 AVX-512 VNNI, 1 AVX2,
# 0 portable C; bmv: 2 AVX-512 BF16, 1 AVX2, 0 portable C)
PATHS = {
    "avx512bf16": {"qmv": 2, "ggml": 2, "bmv": 2},
    "avx512": {"qmv": 2, "ggml": 2, "bmv": 1},
    "avx2": {"qmv": 1, "ggml": 1, "bmv": 1},
    "portable": {"qmv": 0, "ggml": 0, "bmv": 0},
    "neon-dotprod": {"qmv": 3, "ggml": 3, "bmv": 0},
    "aarch64-portable": {"qmv": 0, "ggml": 0, "bmv": 0},
}


def open_variant(variant: str, kernel: str):
    """The library of `variant` (skipped where this CPU cannot run it), checked to be that variant
    with `kernel`'s expected instruction path."""
    features = native.cpu_features() or set()
    missing = kernel_build.VARIANTS[variant][2] - features
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}")
    lib = native.open_variant(variant)
    assert lib.kernels_variant().decode() == variant
    assert getattr(lib, f"{kernel}_path")() == PATHS[variant][kernel]
    return lib
