"""One whole SwiGLU expert in a GGUF type through our fused kernel (`GGMLWeight.bind_swiglu`), against a
memcpy of the same bytes, interleaved in one process.

Experts are valid random blocks (tests/test_cpu_ggml.py's generator), enough distinct ones (over the
L3 cache in total) cycled that every call reads its weights from memory. Prints per expert medians
(and min-max) of wall and process CPU time, and the expert's bytes per second.

    python scripts/ggml_expert_bench.py [--types Q4_0,Q8_0,Q4_K,Q6_K] [--hidden 2048 --inter 768]
        [--tokens 1] [--threads 2] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_cpu_ggml import weight  # noqa: E402  (the test's valid random blocks)

TOTAL_BYTES = 96e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_K,Q6_K")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    H, F_ = args.hidden, args.inter
    for name in args.types.split(","):
        t = T[name]
        one = weight(t, F_, H, 0)
        nbytes = 3 * one.nbytes
        copies = max(2, int(TOTAL_BYTES // nbytes))
        experts = []
        for c in range(copies):
            gate, up, down = weight(t, F_, H, 3 * c), weight(t, F_, H, 3 * c + 1), weight(t, H, F_, 3 * c + 2)
            experts.append((gate.bind_swiglu(up, down), (gate, up, down)))
        x = torch.randn(args.tokens, H)
        src = torch.ones(copies * nbytes, dtype=torch.uint8)
        dst = torch.empty(nbytes, dtype=torch.uint8)
        runs = {"ours": ([], []), "memcpy": ([], [])}
        for _ in range(args.rounds):
            for what in runs:
                w0, c0 = time.perf_counter(), time.process_time()
                for c in range(copies):
                    if what == "ours":
                        experts[c][0](x)
                    else:
                        dst.copy_(src[c * nbytes:(c + 1) * nbytes])
                runs[what][0].append((time.perf_counter() - w0) / copies)
                runs[what][1].append((time.process_time() - c0) / copies)
        wall, cpu = runs["ours"]
        mw, mc = runs["memcpy"]
        print(f"{name} expert [{F_}, {H}] x3 ({nbytes / 1e6:.2f} MB) N={args.tokens} threads={args.threads}: "
              f"wall {1e6 * statistics.median(wall):.0f} us ({1e6 * min(wall):.0f}-{1e6 * max(wall):.0f}) "
              f"{nbytes / statistics.median(wall) / 1e9:.2f} GB/s, memcpy {nbytes / statistics.median(mw) / 1e9:.2f} GB/s"
              f" | cpu {1e6 * statistics.median(cpu):.0f} us, memcpy cpu {1e6 * statistics.median(mc):.0f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
