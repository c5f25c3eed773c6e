"""Decode tok/s of two source trees side by side: the same model, fresh processes, interleaved.

Each round runs, for A then B (B then A on odd rounds, so a load change hits both alike), one
process that imports `offload_moe` from that tree, loads the model on the CPU, warms up, and decodes
TOKENS tokens greedily `--repeats` times; each run's `decode_tokens_per_second` is one sample.
Prints per tree the median, min-max and the load average before and after: on a shared machine the
spread is part of the result.

    python scripts/decode_ab.py --rounds 5 A=/tmp/base B=.          # the bundled demo, 200 tokens

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
model = offload_moe.load(model_path, device="cpu")
prompt = list(range(10, 26))
model.generate(prompt, max_new_tokens=16, temperature=0, ignore_eos=True)
rates = []
for _ in range(repeats):
    model.generate(prompt, max_new_tokens=tokens, temperature=0, ignore_eos=True)
    rates.append(model.stats["generation"]["decode_tokens_per_second"])
print(json.dumps([offload_moe.__file__, rates]))
"""


def run(tree: str, args) -> list[float]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    out = subprocess.run([sys.executable, "-c", RUN, args.model or "", str(args.threads), str(args.tokens),
                          str(args.repeats)], env=env, cwd=tree, capture_output=True, text=True, check=True).stdout
    where, rates = json.loads(out.strip().splitlines()[-1])
    if not where.startswith(os.path.abspath(tree)):
        raise SystemExit(f"{tree}: imported offload_moe from {where}")
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs=2, help="LABEL=DIRECTORY")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo)")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    trees = [t.split("=", 1) for t in args.trees]
    samples: dict[str, list[float]] = {label: [] for label, _ in trees}
    print(f"load before: {os.getloadavg()[0]:.2f}")
    for r in range(args.rounds):
        for label, tree in (trees if r % 2 == 0 else trees[::-1]):
            samples[label] += run(tree, args)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    for label, rates in samples.items():
        print(f"{label}: decode tok/s median {statistics.median(rates):.1f} "
              f"(min {min(rates):.1f}, max {max(rates):.1f}, n={len(rates)})")


if __name__ == "__main__":
    main()
