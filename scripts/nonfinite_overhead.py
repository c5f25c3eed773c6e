"""Decode speed with and without the non-finite check of the logits (issue 19), interleaved.

Runs the bundled demo model greedily for N tokens, alternating the current decode loop with the one
before the check (main's `generate.decode_tokens` of commit bb6f3a7, reproduced below), and prints the
median decode tokens/s of each with the spread. Usage: python scripts/nonfinite_overhead.py [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import offload_moe
import offload_moe.api.model as api
from offload_moe.generation.generate import DecodeTiming, decode_tokens, sample


def decode_without_check(model, prompt, max_new_tokens, sampling, timing=None):
    timing = timing if timing is not None else DecodeTiming()
    generator = None if sampling.seed is None else torch.Generator(device=model.device).manual_seed(sampling.seed)
    timing.prompt_tokens = len(prompt)
    t0 = time.perf_counter()
    logits = model(torch.tensor([prompt], device=model.device), start=0, last_only=True)[0, -1]
    pos = len(prompt)
    for i in range(max_new_tokens):
        token = sample(logits, sampling, generator)
        token_id = int(token)
        now = time.perf_counter()
        if i == 0:
            timing.prefill_seconds, t_decode = now - t0, now
        else:
            timing.decode_seconds = now - t_decode
        timing.new_tokens = i + 1
        yield token_id
        if i + 1 == max_new_tokens or pos >= model.max_seq_len:
            return
        logits = model(token.view(1, 1), start=pos, last_only=True)[0, -1]
        pos += 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = offload_moe.load(device="cpu")
    prompt = "ROMEO. What light through yonder window breaks?"
    rates = {"with check": [], "without": []}
    for _ in range(args.repeats):
        for name, loop in (("with check", decode_tokens), ("without", decode_without_check)):
            api.decode_tokens = loop
            model.generate(prompt, max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
            rates[name].append(model.last_timing.decode_tokens_per_second)
    api.decode_tokens = decode_tokens
    for name, r in rates.items():
        print(f"{name:>10}: median {statistics.median(r):.1f} tok/s (min {min(r):.1f}, max {max(r):.1f}, n={len(r)})")


if __name__ == "__main__":
    main()
