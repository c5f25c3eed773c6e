"""Decode tok/s of one GGUF file: ours with and without the one-call layer front, and llama.cpp with
and without its repack, interleaved round by round (issue 25, acceptance 1).

    python scripts/decode_side_by_side.py FILE.gguf [--threads 2] [--rounds 5] [--tokens 32]
        [--llama-bin DIR] [--json OUT]

Each round: ours in this process (the model loaded once; a 16-token prompt, then `--tokens` greedy
tokens, `stats["generation"]["decode_tokens_per_second"]`) with every layer's `LayerFront`, then
with them taken away (the call-by-call path), then `llama-bench -m FILE -t T -p 0 -n TOKENS -r 1
--repack 1` and `--repack 0` (its own process; its t/s). The order of the four alternates by round,
so a change of load hits all alike. Prints medians with min-max, the load average before and after.

`--cold`: the file's pages are dropped from the page cache (POSIX_FADV_DONTNEED) before our load and
before each llama-bench process, so each engine reads the file in the way its own mapping does (ours
asks for huge pages: `base.user_files.advise_huge`) instead of finding the other's pages cached; our
model is reloaded after each llama.cpp run for the same reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from realsize_bench import drop_from_page_cache   # scripts/ is on the path of a script run from it


def ours(model, tokens: int, front: bool) -> float:
    layers = model.transformer.layers
    kept = [layer.front for layer in layers]
    if not front:
        for layer in layers:
            layer.front = None
    try:
        model.generate(list(range(100, 116)), max_new_tokens=tokens + 1, temperature=0, ignore_eos=True)
        return model.stats["generation"]["decode_tokens_per_second"]
    finally:
        for layer, f in zip(layers, kept):
            layer.front = f


def llama(bin_dir: Path, file: str, threads: int, tokens: int, repack: int) -> float:
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", file, "-t", str(threads), "-p", "0", "-n", str(tokens),
                          "-r", "1", "--repack", str(repack), "-o", "json"], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--llama-bin", type=Path,
                   default=Path(os.environ.get("LLAMA_CPP_DIR", ".")) / "build" / "bin")
    p.add_argument("--json", type=Path)
    p.add_argument("--cold", action="store_true", help="drop the file's cached pages before each engine reads it")
    a = p.parse_args()

    import gc
    import torch
    import offload_moe
    torch.set_num_threads(a.threads)
    held = {}

    def load():
        held.pop("model", None)
        gc.collect()
        if a.cold:
            drop_from_page_cache(a.file)
        held["model"] = offload_moe.load(a.file, device="cpu", threads=a.threads)
        ours(held["model"], 8, True)                           # warm: the file's pages, the lazy experts

    def theirs(repack):
        if a.cold:
            held.pop("model", None)
            gc.collect()
            drop_from_page_cache(a.file)
        return llama(a.llama_bin, a.file, a.threads, a.tokens, repack)

    def mine(front):
        if "model" not in held:
            load()
        return ours(held["model"], a.tokens, front)

    runs = {"ours": lambda: mine(True),
            "ours, call by call": lambda: mine(False),
            "llama.cpp --repack 1": lambda: theirs(1),
            "llama.cpp --repack 0": lambda: theirs(0)}
    got = {name: [] for name in runs}
    load_before = os.getloadavg()[0]
    for r in range(a.rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            got[name].append(runs[name]())
            print(json.dumps({"round": r, "runner": name, "tok_s": round(got[name][-1], 2)}), flush=True)
    load_after = os.getloadavg()[0]
    med = {name: statistics.median(v) for name, v in got.items()}
    print(f"\n{a.file}, {a.threads} threads, {a.tokens} tokens, {a.rounds} rounds; "
          f"load average {load_before:.2f} before, {load_after:.2f} after", file=sys.stderr)
    for name, v in got.items():
        print(f"{name:24s} {med[name]:7.2f} tok/s median ({min(v):.2f}-{max(v):.2f})", file=sys.stderr)
    for base in ("llama.cpp --repack 1", "llama.cpp --repack 0"):
        print(f"ours / {base}: {med['ours'] / med[base]:.2f}x "
              f"(call by call {med['ours, call by call'] / med[base]:.2f}x)", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps({"runs": got, "load": [load_before, load_after]}, indent=1))


if __name__ == "__main__":
    main()
