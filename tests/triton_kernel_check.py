"""The Triton kernels against float64 math: every width, several group sizes, each kernel and config.

Run as a script (`python tests/triton_kernel_check.py [cpu|cuda]`, under TRITON_INTERPRET=1 for the
CPU) by tests/test_triton_kernels.py; prints one line per failure and "KERNELS OK" at the end.
The tolerance is the one kernels_triton documents: |y - y64| <= c * sum_k |x_k| |w_nk|.
"""

from __future__ import annotations

import itertools
import sys

import torch

from offload_moe.kernels import kernels_triton as kt
from offload_moe.kernels import QuantizedWeight, quantize

TOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check(dev: str, bits: int, n: int, k: int, gs: int, batch: int, dtype, seed: int, shift: int = 0,
          autotune: bool = False, **kw) -> str | None:
    if dev != "cpu" and not autotune and "config" not in kw:  # one compile per case, not one per config
        kw["config"] = kt.DEFAULT_GEMV if batch <= kt.GEMV_MAX_BATCH else kt.DEFAULT_GEMM
    g = torch.Generator().manual_seed(seed)
    qw = quantize(torch.randn(n, k, generator=g) * 0.05, bits, gs)
    packed = qw.packed
    if shift:  # the same bytes at an address that is not a multiple of 4
        packed = torch.empty(packed.numel() + shift, dtype=torch.uint8)[shift:].view(qw.packed.shape)
        packed.copy_(qw.packed)
        if kt.fast_path(packed, bits, gs):
            return "fast_path accepts a packed tensor that is not 4-byte aligned"
    w64 = qw.dequantize(torch.float64)  # [n, k] the oracle's weights
    x = torch.randn(batch, k, generator=g).to(dtype)
    moved = QuantizedWeight(packed.to(dev), qw.scales.to(dev), qw.zeros.to(dev), bits, gs, (n, k))
    y = kt.dequant_matmul(x.to(dev), moved, **kw)
    ref = x.double() @ w64.T  # [batch, n]
    bound = x.double().abs() @ w64.abs().T
    if y.dtype != dtype or tuple(y.shape) != (batch, n):
        return f"{dtype} {list(y.shape)} returned, expected {dtype} [{batch}, {n}]"
    excess = float(((y.cpu().double() - ref).abs() - TOL[dtype] * bound).max())
    return None if excess <= 0 else f"error exceeds tolerance by {excess:.3g}"


def cases(quick: bool = False):
    """kwargs of check for every case; `quick` (on a GPU, where every case compiles): fewer groups
    and batches, no per-config cases (the interpreter runs those), two autotuned cases."""
    dtypes = itertools.cycle(DTYPES)
    seed = itertools.count()
    if quick:
        for bits in kt.KERNEL_BITS:
            for gs in (32, 64, 128, 40):
                for batch in (1, 16):
                    n, k = (37, 2 * 128) if gs != 40 else (21, 200)
                    yield dict(bits=bits, n=n, k=k, gs=gs, batch=batch, dtype=next(dtypes), seed=next(seed))
        for batch in (1, 9):
            yield dict(bits=4, n=300, k=1024, gs=64, batch=batch, dtype=torch.bfloat16, seed=next(seed),
                       autotune=True)
        return
    for bits in kt.KERNEL_BITS:
        for gs in (8, 16, 32, 64, 128, 40):
            for batch in (1, 3, 16):
                n, k = (37, 3 * 128) if gs != 40 else (21, 200)  # 384: not a multiple of the tiles
                yield dict(bits=bits, n=n, k=k, gs=gs, batch=batch, dtype=next(dtypes), seed=next(seed))
    for kernel, table, bits in (("gemv", kt.GEMV_CONFIGS, 3), ("gemm", kt.GEMM_CONFIGS, 4)):
        for config in table:  # every autotuning candidate computes the same thing
            yield dict(bits=bits, n=40, k=1024, gs=64, batch=2 if kernel == "gemv" else 9,
                       dtype=next(dtypes), seed=next(seed), kernel=kernel, config=config)
    for bits in kt.KERNEL_BITS:  # the byte kernel also serves groups the word kernels take
        yield dict(bits=bits, n=33, k=256, gs=64, batch=2, dtype=next(dtypes), seed=next(seed), kernel="generic")


def main(dev: str, quick: bool = False) -> int:
    failures = []
    for c in cases(quick):
        msg = check(dev, **dict(c))
        if msg:
            failures.append(f"{ {k: v for k, v in c.items()} }: {msg}")
    if dev == "cpu":  # a copy to the GPU would realign it
        msg = check(dev, 4, 16, 128, 64, 1, torch.float32, 0, shift=1)
        if msg:
            failures.append(f"misaligned: {msg}")
    for f in failures:
        print("FAIL", f)
    if not failures:
        print("KERNELS OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"),
                  quick="--quick" in sys.argv))
