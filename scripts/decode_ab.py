"""Decode tok/s of two source trees side by side: the same model, fresh processes, interleaved.

Each round runs, for A then B (B then A on odd rounds, so a load change hits both alike), one
process that imports `offload_moe` from that tree, loads the model on the CPU, warms up, and decodes
TOKENS tokens greedily `--repeats` times; each run's `decode_tokens_per_second` is one sample.
Prints per tree the median, min-max, the aten operations of one decode step (counted by a torch
dispatch mode: the same on a loaded machine as on a quiet one), and the load average before and
after: on a shared machine the spread is part of the result.

    python scripts/decode_ab.py --rounds 5 A=/tmp/base B=.          # the bundled demo, 200 tokens
    python scripts/decode_ab.py --load '{"cache_slots": 3, "prefetch": 1}' A=/tmp/base B=.   # offloaded

A tree is LABEL=DIRECTORY (the directory that holds `offload_moe/`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RUN = r"""
import json, sys, torch
import offload_moe
model_path, threads, tokens, repeats = sys.argv[1] or None, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = offload_moe.load(model_path, device="cpu", threads=threads, **json.loads(sys.argv[5]))
prompt = list(range(10, 26))
model.generate(prompt, max_new_tokens=16, temperature=0, ignore_eos=True)
rates = []
for _ in range(repeats):
    model.generate(prompt, max_new_tokens=tokens, temperature=0, ignore_eos=True)
    rates.append(model.stats["generation"]["decode_tokens_per_second"])
from torch.utils._python_dispatch import TorchDispatchMode
from offload_moe.generation.generate import Sampling, decode_tokens

class Ops(TorchDispatchMode):   # aten calls of one decode step: a load-independent figure
    n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Ops.n += 1
        return func(*args, **(kwargs or {}))

steps = decode_tokens(model.transformer, prompt, 3, Sampling(temperature=0))
next(steps)
with Ops():
    next(steps)
print(json.dumps([offload_moe.__file__, rates, Ops.n]))
"""


def run(tree: str, args) -> list[float]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    argv = [args.model or "", str(args.threads), str(args.tokens), str(args.repeats), args.load]
    out = subprocess.run([sys.executable, "-c", RUN, *argv], env=env, cwd=tree, capture_output=True, text=True,
                         check=True).stdout
    where, rates, ops = json.loads(out.strip().splitlines()[-1])
    if not where.startswith(os.path.abspath(tree)):
        raise SystemExit(f"{tree}: imported offload_moe from {where}")
    return rates, ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs=2, help="LABEL=DIRECTORY")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo)")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", default="{}", help='load() keywords as JSON, e.g. \'{"cache_slots": 3, "prefetch": 1}\'')
    args = p.parse_args()
    trees = [t.split("=", 1) for t in args.trees]
    samples: dict[str, list[float]] = {label: [] for label, _ in trees}
    ops: dict[str, int] = {}
    print(f"load before: {os.getloadavg()[0]:.2f}")
    for r in range(args.rounds):
        for label, tree in (trees if r % 2 == 0 else trees[::-1]):
            rates, ops[label] = run(tree, args)
            samples[label] += rates
    print(f"load after: {os.getloadavg()[0]:.2f}")
    for label, rates in samples.items():
        print(f"{label}: decode tok/s median {statistics.median(rates):.1f} "
              f"(min {min(rates):.1f}, max {max(rates):.1f}, n={len(rates)}); "
              f"{ops[label]} aten ops per decode step")


if __name__ == "__main__":
    main()
