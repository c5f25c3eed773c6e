"""The file tier's read-ahead, measured: decode from a GGUF whose experts stream from the file through a
RAM expert cache too small for a token's experts, with `prefetch` 0, 1, 2 (layers ahead whose guessed
experts are read on the I/O thread while this layer computes).

Each run is a fresh process inside a fresh memory cgroup (realsize_bench's), the file's pages dropped
first, so misses are disk reads; rounds interleave the settings. Per run: decode tok/s, stall per
token (compute waiting for a read), read-ahead used / issued (a read ahead never used is wasted
bandwidth), GB read.

    python scripts/readahead_bench.py FILE.gguf --slots 12 --prefetch 0,1,2 --rounds 3 --cgroup-mem 3G
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realsize_bench import MemoryCgroup, drop_from_page_cache, parse_bytes  # noqa: E402

RUN = r"""
import json, sys
import torch, offload_moe
path, slots, prefetch, threads, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
m = offload_moe.load(path, device="cpu", cache_slots=slots, prefetch=prefetch, context_length=256, threads=threads)
ids = list(range(10, 26))
m.generate(ids, max_new_tokens=1, temperature=0, ignore_eos=True)
m.experts.reset_stats()
m.generate(ids, max_new_tokens=tokens + 1, temperature=0, ignore_eos=True)
e, g = m.experts.stats(), m.stats["generation"]
print("RESULT " + json.dumps({"decode": g["decode_tokens_per_second"], "tokens": g["new_tokens"],
      "stall": e["stall_seconds"], "hit_rate": e["hit_rate"], "issued": e["prefetch_issued"],
      "used": e["prefetch_used"], "read": e["bytes_moved"]}))
"""


def one(args, prefetch: int) -> dict | None:
    cg = MemoryCgroup(args.cgroup_mem)
    try:
        drop_from_page_cache(args.gguf)
        out = subprocess.run([sys.executable, "-c", RUN, args.gguf, str(args.slots), str(prefetch),
                              str(args.threads), str(args.tokens)], capture_output=True, text=True,
                             preexec_fn=cg.enter, timeout=args.timeout, cwd=args.src,
                             env=dict(os.environ, PYTHONPATH=str(args.src)))
    finally:
        cg.remove()
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        print(f"  prefetch {prefetch}: FAILED {out.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("--slots", type=int, required=True, help="RAM expert cache slots per layer")
    p.add_argument("--prefetch", default="0,1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cgroup-mem", default="3G")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent, help="offload_moe tree to run")
    args = p.parse_args()
    args.cgroup_mem = parse_bytes(args.cgroup_mem)
    depths = [int(x) for x in args.prefetch.split(",")]
    print(f"{args.gguf}; slots {args.slots}; cgroup {args.cgroup_mem / 2**30:.1f} GiB; load {os.getloadavg()[0]:.2f}",
          flush=True)
    runs = {d: [] for d in depths}
    for r in range(args.rounds):
        for d in depths[r % len(depths):] + depths[:r % len(depths)]:
            x = one(args, d)
            if x:
                runs[d].append(x)
                print(f"  round {r + 1} prefetch {d}: {x['decode']:.2f} tok/s, stall {x['stall'] / x['tokens'] * 1e3:.0f} "
                      f"ms/token, hit rate {x['hit_rate']:.1%}, read ahead {x['used']}/{x['issued']} used, "
                      f"{x['read'] / 1e9:.2f} GB read", flush=True)
    print(f"load after {os.getloadavg()[0]:.2f}\n\n| prefetch | decode tok/s | stall ms/token | read ahead used / issued | GB read per token |")
    print("|---:|---:|---:|---:|---:|")
    for d, xs in runs.items():
        if not xs:
            continue
        med = lambda f: statistics.median(f(x) for x in xs)  # noqa: E731
        lo_hi = f"{min(x['decode'] for x in xs):.2f}–{max(x['decode'] for x in xs):.2f}"
        print(f"| {d} | {med(lambda x: x['decode']):.2f} ({lo_hi}) | {med(lambda x: x['stall'] / x['tokens'] * 1e3):.0f} | "
              f"{sum(x['used'] for x in xs)} / {sum(x['issued'] for x in xs)} | "
              f"{med(lambda x: x['read'] / x['tokens'] / 1e9):.3f} |")


if __name__ == "__main__":
    main()
