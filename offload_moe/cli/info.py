"""`offload-moe info PATH`: what a checkpoint holds, read from its headers only; given a config.json
file (as `plan` takes), what the config alone says."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..checkpoints.config import ModelConfig
from ..checkpoints.hub import parse_reference
from ..base.runtime import DEMO_DIR
from ..api.sources import open_checkpoint
from .common import fetch
from .console import human_bytes, human_count, stdout


def add_parser(sub):
    p = sub.add_parser("info", help="describe a checkpoint (architecture, parameters, bytes by kind)",
                       description="Describe a checkpoint directory or GGUF file without loading its weights.")
    p.add_argument("path", metavar="PATH_OR_ID", nargs="?", default=str(DEMO_DIR),
                   help="checkpoint directory, .gguf file, config.json file or Hugging Face repo id (org/name[@rev]) "
                        "(default: the bundled demo model, as every command)")
    p.set_defaults(func=run)


def weight_rows(by_kind: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
    """One row per kind of weight, `(label, "bytes (params)")`, as `info` and `plan` both show them."""
    return [(f"weights: {kind}", f"{human_bytes(nbytes)} ({human_count(params)} params)")
            for kind, (params, nbytes) in by_kind.items()]


def run(args) -> int:
    ckpt = None
    if Path(args.path).is_file() and Path(args.path).suffix.lower() == ".json":
        c = ModelConfig.load(args.path)
    else:
        ckpt = open_checkpoint(fetch(args.path))  # a Hugging Face repo id: from the cache, else downloaded
        c = ckpt.config
    table = Table(title=str(args.path if ckpt is None or parse_reference(args.path) else ckpt.path), show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right", overflow="fold")
    rows = [
        ("architecture", f"{c.model_type} ({c.num_layers} layers, {c.num_experts} experts, top-{c.top_k})"),
        ("hidden / expert intermediate", f"{c.hidden_size} / {c.intermediate_size}"),
        ("attention heads (kv)", f"{c.num_heads} ({c.num_kv_heads}), head dim {c.head_dim}"),
        ("parameters total", human_count(c.total_params)),
        ("parameters active per token", human_count(c.active_params)),
        ("one expert", f"{human_count(c.params_per_expert)} params"),
    ]
    if ckpt is not None:
        rows.append(("expert layout", ckpt.layout.replace("_", " ")))
        rows += weight_rows(ckpt.weights_by_kind())
        if hasattr(ckpt, "stored_types"):  # a pre-quantized checkpoint's formats beside the floats it keeps
            rows.append(("stored types", "; ".join(f"{kind} {', '.join(types)}"
                                                   for kind, types in ckpt.stored_types().items())))
        if getattr(ckpt, "in_place", False):  # a CPU run computes from the mapping: no copy, no repack
            rows.append(("on the CPU", "weights mapped where they lie (file pages, not anonymous memory)"))
        rows += [("dtypes", ", ".join(ckpt.dtypes())),
                 ("shards", f"{len(ckpt.shard_files())} ({human_bytes(ckpt.total_bytes())})")]
    else:
        rows.append(("weights", f"not read (a config file alone; dtype {c.torch_dtype})"))
    rows += [("context", f"{c.max_position_embeddings} positions"
                         + (f", sliding window {c.sliding_window}" if c.sliding_window else ""))]
    if c.quantization:
        q = c.quantization
        rows.append(("quantization", ", ".join(f"{k}={v}" for k, v in q.items() if not isinstance(v, dict))))
    for row in rows:
        table.add_row(*row)
    stdout.print(table)
    return 0
