"""`offload-moe pull ID`: download a model from the Hugging Face Hub into its cache, ahead of use."""

from __future__ import annotations

from pathlib import Path

from ..base.errors import OffloadMoeError
from ..checkpoints.hub import parse_reference
from .common import fetch
from .console import human_bytes, stdout


def add_parser(sub):
    p = sub.add_parser(
        "pull", help="download a model from the Hugging Face Hub into its cache",
        description="Download what offload-moe loads of a Hugging Face model repo (config, safetensors weights, "
                    "tokenizer, chat template, generation_config.json; never pickles) into the Hugging Face cache "
                    "(HF_HOME / HF_HUB_CACHE), checking free disk space first. Files already cached are kept; an "
                    "interrupted pull continues where it stopped. Gated or private repos: `hf auth login` or HF_TOKEN.")
    p.add_argument("model", metavar="ID", help="repo id: org/name, or org/name@revision (branch, tag or commit)")
    p.add_argument("--config-only", action="store_true",
                   help="fetch config.json only (enough for `offload-moe plan`)")
    p.set_defaults(func=run)


def run(args) -> int:
    ref = parse_reference(args.model)
    if ref is None:
        what = "is a local path" if Path(args.model).exists() else "is not a repo id"
        raise OffloadMoeError(f"{args.model}: {what}; expected a Hugging Face repo id such as "
                              "mistralai/Mixtral-8x7B-Instruct-v0.1 (org/name, optionally @revision)")
    want = "config" if args.config_only else "model"
    folder = fetch(str(ref), want=want, refresh=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    stdout.print(f"{ref}: {human_bytes(size)} in {folder}", markup=False, highlight=False)
    return 0
