"""Arguments shared by the commands that load a model, and the loading itself (with progress)."""

from __future__ import annotations

from .. import load
from .console import progress_bar


def add_model_arguments(p):
    p.add_argument("--model", metavar="PATH", help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, help="compute dtype for dense weights (default: the checkpoint's)")
    p.add_argument("--context-length", type=int, default=None, metavar="N",
                   help="tokens the KV cache holds (default: min(model limit, 4096))")


def add_sampling_arguments(p):
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 is greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P")
    p.add_argument("--top-k", type=int, default=0, metavar="K")
    p.add_argument("--seed", type=int, default=None, metavar="S")


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed)


def load_kwargs(args) -> dict:
    return dict(device=args.device, dtype=args.dtype, context_length=args.context_length)


def load_model(args):
    with progress_bar() as report:
        return load(args.model, progress=report, **load_kwargs(args))
