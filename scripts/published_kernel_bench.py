"""How fast the CPU computes one Qwen3-30B-A3B expert in the publishers' formats, beside our own.

One expert is w1, w3 [768, 2048] and w2 [2048, 768], computed whole (SwiGLU, `expert_forward`) at one
token, each call on another of `--copies` experts in turn so the weights come from RAM rather than
the last-level cache. Formats: FP8 with 128 x 128 blocks, compressed-tensors pack-quantized int4
(group 128, symmetric), GPTQ int4 (group 128; in order, and desc_act with shuffled groups), all
through `quant/published_mv.c`; beside them our groupwise int4 (group 64, the qmv kernel, int8
activations) and bf16 (our bf16 kernel), as a CPU run holds them. Codes are random with fixed
scales: throughput does not depend on them. Rounds interleave the formats; medians with the
spread (min .. max) of the rounds' per-call times, and GB/s of stored bytes read.

    python scripts/published_kernel_bench.py --threads 2 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from offload_moe.experts.cpu_kernels import resident_cpu_form, weight_nbytes
from offload_moe.model.expert_interface import ExpertWeights, expert_forward
from offload_moe.kernels.groupwise import quantize
from offload_moe.kernels.published import FP8BlockWeight, GPTQWeight, IntPackWeight

H, I, GROUP = 2048, 768, 128
SHAPES = {"w1": (I, H), "w3": (I, H), "w2": (H, I)}


def words(*shape) -> torch.Tensor:
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32)


def fp8(O, K):
    return FP8BlockWeight(torch.randint(0, 126, (O, K), dtype=torch.uint8), torch.rand(-(-O // 128), -(-K // 128)) * 1e-3,
                          (128, 128))


def pack(O, K):
    return IntPackWeight(words(O, K // 8), (torch.rand(O, K // GROUP) * 1e-3).to(torch.bfloat16), None, GROUP, 4, K)


def gptq(O, K, desc_act=False):
    g_idx = (torch.arange(K) // GROUP).int()
    if desc_act:
        g_idx = g_idx[torch.randperm(K)].contiguous()
    return GPTQWeight(words(K // 8, O), words(K // GROUP, O // 8), (torch.rand(K // GROUP, O) * 1e-3).half(), g_idx, 4, 1,
                      GPTQWeight.sorted_order(g_idx) if desc_act else None)


def ours_int4(O, K):
    return quantize(torch.randn(O, K) * 0.02, 4, 64)


FORMATS = {"fp8-block": fp8, "int4-pack": pack, "gptq-int4": gptq,
           "gptq-int4 desc_act": lambda O, K: gptq(O, K, True),
           "ours int4 (qmv)": ours_int4, "bf16": lambda O, K: torch.randn(O, K, dtype=torch.bfloat16) * 0.02}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--copies", type=int, default=16, help="experts per format, used in turn")
    ap.add_argument("--calls", type=int, default=20, help="timed calls per format per round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    experts = {name: [resident_cpu_form(ExpertWeights(**{m: make(*s) for m, s in SHAPES.items()}))
                      for _ in range(args.copies)] for name, make in FORMATS.items()}
    x32, x16 = torch.randn(1, H), torch.randn(1, H).bfloat16()   # bf16 weights take bf16 activations, as a bf16 run
    times = {name: [] for name in FORMATS}
    for _ in range(args.rounds):
        for name, copies in experts.items():
            x = x16 if name == "bf16" else x32
            for w in copies[:2]:
                expert_forward(x, w)   # warm-up
            t = time.perf_counter()
            for i in range(args.calls):
                expert_forward(x, copies[i % len(copies)])
            times[name].append((time.perf_counter() - t) / args.calls)
    print(f"Qwen3-30B-A3B expert [{I}, {H}] x3, 1 token, {args.threads} threads, {args.rounds} rounds")
    for name, ts in times.items():
        nbytes = weight_nbytes(experts[name][0])
        med = statistics.median(ts)
        print(f"| {name} | {nbytes / 1e6:.2f} MB | {med * 1e3:.2f} ms ({min(ts) * 1e3:.2f} .. {max(ts) * 1e3:.2f}) "
              f"| {nbytes / med / 1e9:.2f} GB/s |")


if __name__ == "__main__":
    main()
