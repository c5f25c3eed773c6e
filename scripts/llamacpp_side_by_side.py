"""CPU decode side by side with llama.cpp: interleaved rounds, medians and spread, one table.

Each round runs, for every pair, `llama-bench -p 0 -n TOKENS -t THREADS -r 1` on the GGUF file
and our decode of TOKENS tokens (greedy, EOS ignored, after a warm-up) in a fresh process with the
same thread count, alternating between the two so load changes hit both alike. The load average
is printed before and after: on a shared machine the spread is part of the result.

    python scripts/llamacpp_side_by_side.py --llama-bin LLAMA_CPP/build/bin --threads 2 --rounds 3 \\
        bf16=CKPT/bf16:mix-f16.gguf int4=CKPT/int4:mix-Q4_0.gguf int8=CKPT/int8:mix-Q8_0.gguf

A pair is LABEL=OUR_CHECKPOINT_DIR:GGUF_FILE (GGUF may be empty: ours only); `--dtype` applies to
ours (e.g. bf16 to run an fp32 checkpoint in bf16). BENCHMARKS.md records how the checkpoint and the
GGUF files were made (scripts/make_bench_checkpoint.py, scripts/gguf_convert.py, llama-quantize).
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
import json, sys, torch
import offload_moe
path, threads, tokens, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] or None
torch.set_num_threads(threads)
model = offload_moe.load(path, device="cpu", dtype=dtype, threads=threads)
prompt = list(range(10, 26))
model.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True)
model.generate(prompt, max_new_tokens=tokens, temperature=0, ignore_eos=True)
print(json.dumps(model.stats["generation"]["decode_tokens_per_second"]))
"""


def ours(path: str, threads: int, tokens: int, dtype: str | None) -> float:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", OURS, path, str(threads), str(tokens), dtype or ""],
                         capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def llama(bin_dir: Path, gguf: str, threads: int, tokens: int) -> float:
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", gguf, "-p", "0", "-n", str(tokens), "-t", str(threads),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}–{max(values):.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pairs", nargs="+", metavar="LABEL=DIR:GGUF")
    p.add_argument("--llama-bin", type=Path, required=True, help="directory holding llama-bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default=None, help="our compute dtype (default: the checkpoint's)")
    args = p.parse_args()
    pairs = []
    for spec in args.pairs:
        label, _, rest = spec.partition("=")
        ckpt, _, gguf = rest.partition(":")
        pairs.append((label, ckpt, gguf))
    results = {(label, engine): [] for label, _, _ in pairs for engine in ("ours", "llama.cpp")}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for r in range(args.rounds):
        for i, (label, ckpt, gguf) in enumerate(pairs):
            runs = [("ours", lambda: ours(ckpt, args.threads, args.tokens, args.dtype))]
            if gguf:
                runs.append(("llama.cpp", lambda: llama(args.llama_bin, gguf, args.threads, args.tokens)))
            if (r + i) % 2:
                runs.reverse()  # alternate which engine goes first
            for engine, fn in runs:
                tps = fn()
                results[(label, engine)].append(tps)
                print(f"round {r + 1} {label:6s} {engine:9s} {tps:7.1f} tok/s", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(f"| format | offload_moe tok/s, median (min–max) | llama.cpp tok/s | ratio of medians |")
    print("|---|---:|---:|---:|")
    for label, _, gguf in pairs:
        o, ll = results[(label, "ours")], results[(label, "llama.cpp")]
        ratio = f"{statistics.median(o) / statistics.median(ll):.2f}×" if ll else "–"
        print(f"| {label} | {spread(o)} | {spread(ll) if ll else '–'} | {ratio} |")


if __name__ == "__main__":
    main()
