"""Where a quantized CPU product should stop reading packed codes and start multiplying dequantized rows.

For each token count, times the qmv kernel (`QmvMatrix.linear` below its threshold) against the
row-chunk dequantize + dense product (`_chunked_linear`) on the same matrices, interleaved,
several distinct matrices in turn (out of the last-level cache), medians of `--repeats`. The
crossover sets `cpu_qmv.DEQUANT_MIN_TOKENS`.

    python scripts/prefill_crossover.py --threads 2 --shape 2816x1024 --shape 1024x2816
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from offload_moe.kernels import quantize
from offload_moe.kernels.cpu_qmv import to_qmv


def timed(fn, mats, x, repeats: int) -> float:
    fn(mats[0], x)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in mats:
            fn(m, x)
        out.append((time.perf_counter() - t0) / len(mats))
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--bits", default="4,8")
    p.add_argument("--shape", action="append", default=None, help="OUTxIN (repeatable; default 2816x1024)")
    p.add_argument("--tokens", default="8,16,32,48,64,96,128,256")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, medians of {args.repeats}, {args.copies} matrices in turn; ms per product")
    print("| shape | bits | tokens | qmv kernel | dequantize + dense | faster |")
    print("|---|---:|---:|---:|---:|---|")
    for shape in args.shape or ["2816x1024"]:
        out, inn = map(int, shape.split("x"))
        for bits in map(int, args.bits.split(",")):
            mats = [to_qmv(quantize(torch.randn(out, inn) * 0.02, bits, 64)) for _ in range(args.copies)]
            for n in map(int, args.tokens.split(",")):
                x = torch.randn(n, inn, dtype=torch.bfloat16)
                direct = timed(lambda m, x: m.linear_packed(x), mats, x, args.repeats)
                dense = timed(lambda m, x: m._chunked_linear(x), mats, x, args.repeats)
                print(f"| {shape} | {bits} | {n} | {direct * 1e3:.2f} | {dense * 1e3:.2f} | "
                      f"{'kernel' if direct < dense else 'dense'} |")


if __name__ == "__main__":
    main()
