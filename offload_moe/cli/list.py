"""`offload-moe list`: the models in the Hugging Face cache that offload-moe can run, with their sizes."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from ..checkpoints.hub import cached_models
from .console import human_bytes, stderr, stdout


def add_parser(sub):
    p = sub.add_parser("list", help="list the cached Hugging Face models offload-moe can run",
                       description="List the model revisions in the Hugging Face cache (HF_HOME / HF_HUB_CACHE) "
                                   "whose config.json is a family offload-moe runs, with their size on disk.")
    p.set_defaults(func=run)


def run(args) -> int:
    from huggingface_hub import constants

    models = cached_models()
    if not models:
        stderr.print(f"offload-moe: no model offload-moe can run in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
                     "`offload-moe pull ORG/NAME` downloads one", markup=False, highlight=False)
        return 0
    table = Table(title=f"Hugging Face cache: {constants.HF_HUB_CACHE}")
    for column, justify in (("model", "left"), ("type", "left"), ("size", "right"), ("status", "left")):
        table.add_column(column, justify=justify)
    for m in models:
        status = "ready" if not m.missing else f"incomplete ({m.missing[0]} missing)"
        table.add_row(Text(m.reference), Text(m.model_type), Text(human_bytes(m.size_on_disk)), Text(status))
    stdout.print(table)
    for m in models:  # below the table, whole at any width, so the command can be copied
        if m.missing:
            stdout.print(f"to finish {m.reference}: offload-moe pull {m.reference}", markup=False, highlight=False,
                         soft_wrap=True)
    return 0
