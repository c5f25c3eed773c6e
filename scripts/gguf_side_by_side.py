"""Decode and prefill of one GGUF file: offload_moe trees and llama.cpp side by side, interleaved.

Each round runs, in a rotating order, one fresh process per offload_moe tree (load, warm-up, then
decode TOKENS tokens greedily, then a prefill of each --prefill length, each on its own tokens) and
`llama-bench` on the same file with its default repack and with `--repack 0`, all with THREADS
threads. Prints every sample, then per runner the median and min-max of each figure, and the load
average before and after: on a shared machine the spread is part of the result.

    python scripts/gguf_side_by_side.py --gguf FILE --llama-bin LLAMA_CPP/build/bin --rounds 3 base=/tmp/base new=.

A tree is LABEL=DIRECTORY (the directory that holds `offload_moe/`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

OURS = r"""
import json, sys
# the tree given, not an editable install's finder (which sys.meta_path consults before PYTHONPATH)
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, sys.argv[5])
import torch
import offload_moe
assert offload_moe.__file__.startswith(sys.argv[5]), offload_moe.__file__
path, threads, tokens, prefills = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(threads)
model = offload_moe.load(path, device="cpu", threads=threads)
model.generate(list(range(10, 26)), max_new_tokens=4, temperature=0, ignore_eos=True)
out = {}
model.generate(list(range(30, 46)), max_new_tokens=tokens, temperature=0, ignore_eos=True)
out["decode"] = model.stats["generation"]["decode_tokens_per_second"]
for i, n in enumerate(prefills):
    model.generate(list(range(1000 + 1000 * i, 1000 + 1000 * i + n)), max_new_tokens=1, temperature=0, ignore_eos=True)
    out[f"prefill{n}"] = model.stats["generation"]["prefill_tokens_per_second"]
out["dtype"] = str(model.dtype)
print(json.dumps(out))
"""


def ours(tree: str, gguf: str, threads: int, tokens: int, prefills: list[int]) -> dict:
    out = subprocess.run([sys.executable, "-c", OURS, gguf, str(threads), str(tokens), json.dumps(prefills),
                          str(Path(tree).resolve())], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama(bin_dir: str, gguf: str, threads: int, tokens: int, prefills: list[int], repack: int) -> dict:
    out = subprocess.run([str(Path(bin_dir) / "llama-bench"), "-m", gguf, "-p", ",".join(map(str, prefills)),
                          "-n", str(tokens), "-t", str(threads), "-r", "1", "--repack", str(repack), "-o", "json"],
                         capture_output=True, text=True, check=True)
    res = {}
    for test in json.loads(out.stdout):
        res["decode" if test["n_gen"] else f"prefill{test['n_prompt']}"] = test["avg_ts"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="*", help="LABEL=DIRECTORY holding offload_moe/")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--llama-bin", help="llama.cpp's build/bin (llama-bench); omitted: ours only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, nargs="*", default=[128, 512])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    runners = {label: (lambda d=d: ours(d, args.gguf, args.threads, args.tokens, args.prefill))
               for label, d in (t.split("=", 1) for t in args.trees)}
    if args.llama_bin:
        for repack in (1, 0):
            runners[f"llama.cpp --repack {repack}"] = (
                lambda r=repack: llama(args.llama_bin, args.gguf, args.threads, args.tokens, args.prefill, r))
    print("load average before:", " ".join(f"{v:.2f}" for v in os.getloadavg()), flush=True)
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in runners}
    names = list(runners)
    for r in range(args.rounds):
        for label in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
            res = runners[label]()
            print(f"round {r + 1} {label:22s} {json.dumps(res)}", flush=True)
            for k, v in res.items():
                if isinstance(v, float):
                    samples[label].setdefault(k, []).append(v)
    print("load average after:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    keys = ["decode", *(f"prefill{n}" for n in args.prefill)]
    print("| runner | " + " | ".join(f"{k} tok/s median (min-max)" for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for label, s in samples.items():
        cells = [f"{statistics.median(s[k]):.2f} ({min(s[k]):.2f}-{max(s[k]):.2f})" if s.get(k) else "-" for k in keys]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
