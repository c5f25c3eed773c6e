"""`offload-moe quantize SRC DST`: write a quantized copy of a checkpoint, one layer at a time.

A byte progress bar with ETA goes to stderr; one summary line (dst, bytes before → after, ratio)
goes to stdout. Bad arguments, an existing DST or a full disk are one-line errors (exit 1), and DST
is then left as it was.
"""

from __future__ import annotations

from rich.progress import Progress

from ..checkpoints.checkpoint import Checkpoint
from ..api.sources import open_checkpoint
from ..tools.convert import quantize
from .common import fetch
from ..kernels.format import SETTINGS
from .console import byte_progress_columns, human_bytes, stderr, stdout


def add_parser(sub):
    widths = ", ".join(SETTINGS)
    p = sub.add_parser(
        "quantize", help="write a quantized copy of a checkpoint (streams one layer at a time)",
        description="Quantize checkpoint SRC into the new directory DST (never overwritten). Each kind of "
                    f"weight gets a width: one of {widths}. Norms and routers are copied as they are.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory, .gguf file or Hugging Face repo id "
                   "(org/name[@rev]) to read")
    p.add_argument("dst", metavar="DST", help="new directory to write (must not exist)")
    p.add_argument("--experts", default="int3", metavar="WIDTH", help="routed expert weights (default int3)")
    p.add_argument("--attention", default="int4", metavar="WIDTH", help="attention projections (default int4)")
    p.add_argument("--embeddings", default="bf16", metavar="WIDTH",
                   help="embed_tokens and lm_head (default bf16)")
    p.add_argument("--group-size", type=int, default=64, metavar="N",
                   help="input weights per fp16 scale and zero (default 64)")
    p.add_argument("--method", default="hqq", metavar="METHOD",
                   help="hqq (zero-point optimisation, the default) or rtn (plain round-to-nearest)")
    p.add_argument("--device", default="auto",
                   help="where to compute: auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    p.set_defaults(func=run)


def run(args) -> int:
    # Only a terminal gets the live bar: rich would leave a blank line on a redirected stderr.
    args.src = fetch(args.src)  # a Hugging Face repo id: from the cache, else downloaded
    with Progress(*byte_progress_columns(), console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        task = None

        def report(what: str, done: int, total: int):
            nonlocal task
            if task is None:
                task = bar.add_task(what, total=total)
            bar.update(task, completed=done, total=total)

        dst = quantize(args.src, args.dst, experts=args.experts, attention=args.attention,
                       embeddings=args.embeddings, group_size=args.group_size, method=args.method,
                       progress=report, device=args.device)
    before = open_checkpoint(args.src).total_bytes()
    after = Checkpoint(dst).total_bytes()
    stdout.print(f"{dst}: {human_bytes(before)} → {human_bytes(after)} ({before / after:.2f}x smaller, "
                 f"{after / before:.1%} of the original)", markup=False, highlight=False)
    return 0
