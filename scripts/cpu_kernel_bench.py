"""How fast the CPU expert kernels read a Mixtral-8x7B expert, against this machine's memcpy.

One expert is w1, w3 [14336, 4096] and w2 [4096, 14336]. For int4 and int8 (groupwise, group 64,
in the CPU form `offload_moe.experts.cpu_kernels` gives them at load: our qmv kernel where it is built, else
torch's int4 kernel) and bf16 (our bf16mv kernel where it is built, else prepacked for oneDNN), times each matrix's product and the whole
SwiGLU expert at batch 1 (and `--batch` tokens), and reports GB/s of packed weight bytes read. The
yardstick is a large RAM -> RAM tensor copy timed in the same run (bytes copied per second; the
memory system moves twice that). Each timed call reads another of `--copies` experts in turn, so
the weights come from RAM, not from the last-level cache (a 4-bit w1 is 29 MB). Weight values are
random codes with fixed scales: throughput does not depend on them. Beside them: torch's int4
kernel (the fallback), bf16 F.linear without the prepacking and oneDNN prepacked against ours at
1-32 tokens (where ours stops beating plain F.linear, which the model falls back to, sets
`BMV_MAX_TOKENS`), and torch's per-channel int8 kernel
(`_weight_int8pack_mm`, which cannot take our groupwise scales) as the alternative torch offers
for 8 bits.

    python scripts/cpu_kernel_bench.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from offload_moe.experts.cpu_kernels import int4_supported, resident_cpu_form, to_int4_planes, weight_nbytes
from offload_moe.base.timing import measure_copy_rate
from offload_moe.model.expert_interface import ExpertWeights, expert_forward, linear
from offload_moe.kernels import native
from offload_moe.kernels.cpu_bf16 import PackedBF16, packing_available
from offload_moe.kernels.groupwise import QuantizedWeight, qlinear
from offload_moe.kernels.pack import packed_cols

HIDDEN, INTERMEDIATE, GROUP = 4096, 14336, 64
SHAPES = {"w1": (INTERMEDIATE, HIDDEN), "w3": (INTERMEDIATE, HIDDEN), "w2": (HIDDEN, INTERMEDIATE)}


def random_expert(fmt: str, seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    if fmt == "bf16":
        return ExpertWeights(**{m: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for m, s in SHAPES.items()})
    bits = int(fmt.removeprefix("int"))
    mats = {}
    for m, (out, inn) in SHAPES.items():
        packed = torch.randint(0, 256, (out, packed_cols(inn, bits)), dtype=torch.uint8, generator=g)
        scales = torch.full((out, inn // GROUP), 0.01, dtype=torch.float16)
        zeros = torch.full((out, inn // GROUP), float(2 ** (bits - 1)), dtype=torch.float16)
        mats[m] = QuantizedWeight(packed, scales, zeros, bits, GROUP, (out, inn))
    return ExpertWeights(**mats)


def seconds(fn, argsets: list[tuple], repeats: int) -> list[float]:
    """Wall times of `fn(*args)` over `repeats` passes through `argsets` (one time per pass, divided
    by its calls), after one warm-up call."""
    fn(*argsets[-1])
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for args in argsets:
            fn(*args)
        out.append((time.perf_counter() - t0) / len(argsets))
    return out


def bmv_product(lib, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Our bf16 kernel at any token count (the model stops at BMV_MAX_TOKENS)."""
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
    lib.bmv(x.data_ptr(), y.data_ptr(), 1, x.shape[0], w.shape[0], w.shape[1], w.data_ptr(), torch.get_num_threads())
    return y


def nbytes(w) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="a second, small batch size to time the expert at")
    p.add_argument("--formats", default="int4,int8,bf16")
    p.add_argument("--copies", type=int, default=3, help="distinct experts timed in turn (defeats the L3 cache)")
    p.add_argument("--reference", action="store_true", help="also time qlinear (dequantize + F.linear) on w1")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats (best / mean)")

    memcpy = measure_copy_rate(512 * 2**20, "cpu", "cpu", args.repeats).high
    print(f"memcpy (512 MiB tensor copy): {memcpy / 1e9:6.2f} GB/s copied ({2 * memcpy / 1e9:.2f} GB/s read+write)")

    x1 = torch.randn(1, HIDDEN).bfloat16()
    xi = torch.randn(1, INTERMEDIATE).bfloat16()
    with torch.inference_mode():
        for fmt in args.formats.split(","):
            hosts = [random_expert(fmt, seed) for seed in range(args.copies)]
            host = hosts[0]
            t0 = time.perf_counter()
            ws = [resident_cpu_form(h) for h in hosts]
            w = ws[0]
            convert = (time.perf_counter() - t0) / len(ws)
            print(f"\n{fmt}: expert {weight_nbytes(w) / 1e6:.1f} MB in CPU form {type(w.w1).__name__} "
                  f"({weight_nbytes(host) / 1e6:.1f} MB host form), converted in {convert:.1f} s")
            for m in ("w1", "w2"):
                mat = getattr(w, m)
                x = x1 if m != "w2" else xi
                t = seconds(linear, [(x, getattr(e, m)) for e in ws], args.repeats)
                print(f"  {m} {list(SHAPES[m])} batch 1: {min(t) * 1e3:7.2f} ms  "
                      f"{nbytes(mat) / min(t) / 1e9:5.2f} GB/s best, {nbytes(mat) / statistics.mean(t) / 1e9:5.2f} mean "
                      f"({nbytes(mat) / min(t) / memcpy:.0%} of memcpy)")
            for n in (1, args.batch):
                x = torch.randn(n, HIDDEN).bfloat16()
                t = seconds(expert_forward, [(x, e) for e in ws], args.repeats)
                print(f"  expert batch {n}: {min(t) * 1e3:7.2f} ms  {weight_nbytes(w) / min(t) / 1e9:5.2f} GB/s best, "
                      f"{weight_nbytes(w) / statistics.mean(t) / 1e9:5.2f} mean")
            if fmt == "bf16":  # the alternatives: F.linear on the plain matrix, oneDNN prepacked
                t = seconds(F.linear, [(x1, h.w1) for h in hosts], args.repeats)
                print(f"  w1 plain F.linear (no prepack) batch 1: {min(t) * 1e3:7.2f} ms  "
                      f"{nbytes(host.w1) / min(t) / 1e9:5.2f} GB/s best ({nbytes(host.w1) / min(t) / memcpy:.0%} of memcpy)")
                if packing_available():
                    packed = [PackedBF16(h.w1) for h in hosts]
                    lib = native.load("bmv")
                    for n in (1, 2, 3, 4, 8, 16, 32):  # where our kernel stops winning: BMV_MAX_TOKENS
                        x = torch.randn(n, HIDDEN).bfloat16()
                        t = seconds(lambda pk: pk.linear(x), [(pk,) for pk in packed], args.repeats)
                        line = f"  w1 oneDNN prepacked batch {n:2d}: {min(t) * 1e3:7.2f} ms"
                        plain = seconds(F.linear, [(x, h.w1) for h in hosts], args.repeats)
                        line += f"   plain F.linear {min(plain) * 1e3:7.2f} ms"
                        if lib is not None:
                            ours = seconds(lambda w: bmv_product(lib, x, w), [(h.w1,) for h in hosts], args.repeats)
                            line += (f"   ours {min(ours) * 1e3:7.2f} ms ({min(t) / min(ours):.2f}x prepacked, "
                                     f"{min(plain) / min(ours):.2f}x plain)")
                        print(line)
            if fmt == "int8":  # torch's int8 kernel, per-channel scales only: a bound, not our format
                s8 = torch.full((SHAPES["w1"][0],), 0.01, dtype=torch.bfloat16)
                q8s = [torch.randint(-128, 127, SHAPES["w1"], dtype=torch.int8) for _ in range(args.copies)]
                t = seconds(torch.ops.aten._weight_int8pack_mm, [(x1, q, s8) for q in q8s], args.repeats)
                print(f"  w1 torch _weight_int8pack_mm (per-channel) batch 1: {min(t) * 1e3:7.2f} ms  "
                      f"{q8s[0].numel() / min(t) / 1e9:5.2f} GB/s best ({q8s[0].numel() / min(t) / memcpy:.0%} of memcpy)")
            if fmt != "bf16" and int4_supported(host.w1):  # the fallback: torch's int4 CPU kernel
                planes = [to_int4_planes(h.w1) for h in hosts]
                t = seconds(linear, [(x1, pl) for pl in planes], args.repeats)
                print(f"  w1 torch int4 kernel (fallback) batch 1: {min(t) * 1e3:7.2f} ms  "
                      f"{planes[0].nbytes / min(t) / 1e9:5.2f} GB/s best ({planes[0].nbytes / min(t) / memcpy:.0%} of memcpy)")
            if args.reference and fmt != "bf16":
                t = seconds(qlinear, [(x1, host.w1)], 1)
                print(f"  reference qlinear w1 batch 1: {min(t) * 1e3:7.1f} ms  "
                      f"{nbytes(host.w1) / min(t) / 1e9:5.3f} GB/s")


if __name__ == "__main__":
    main()
