"""`offload-moe plan PATH [--profile NAME_OR_PATH] [--hit-rate X]`: the memory plan, before any download."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.table import Table
from rich.text import Text

from ..placement.planner import auto_profile, plan
from ..placement.profiles import list_profiles, load_profile
from ..checkpoints.gguf.reader import is_gguf
from ..api.sources import load_config, open_checkpoint
from ..tune.disk import measure_file_read
from .common import fetch
from .console import stdout
from .info import weight_rows


def add_parser(sub):
    p = sub.add_parser(
        "plan", help="show where a model's bytes go under a VRAM profile (from config.json alone)",
        description="Plan device, RAM and disk use for a model under a profile, and the bytes each "
                    "token moves, from its config.json alone: no weights are read.")
    p.add_argument("path", metavar="PATH_OR_CONFIG", help="checkpoint directory, config.json file, .gguf file "
                   "(its header) or Hugging Face repo id (org/name[@rev]; only its config.json is fetched)")
    p.add_argument("--profile", metavar="NAME_OR_PATH", default=None,
                   help=f"bundled or user profile ({', '.join(list_profiles())}) or a .toml file "
                        "(default: the largest bundled profile this machine fits)")
    p.add_argument("--hit-rate", type=float, default=None, metavar="X",
                   help="share of needed experts already in place, 0 to 1 (default: estimated from the slots)")
    p.set_defaults(func=run)


def run(args) -> int:
    path = fetch(args.path, want="config")  # a repo id: config.json alone is fetched
    config = load_config(path)
    profile = load_profile(args.profile) if args.profile else auto_profile(config)
    # a GGUF file on the CPU is computed where it lies: its weights are file pages, and experts that do
    # not fit are read from it (at the rate measured on the file itself)
    mapped = is_gguf(args.path) and profile.device == "cpu"
    result = plan(config, profile, hit_rate=args.hit_rate, mapped=mapped)
    if mapped and result.bytes_per_token:
        result = replace(result, disk_rate=measure_file_read(args.path)["bytes_per_second"])
    picked = "" if args.profile else " (picked for this machine)"
    table = Table(title=f"{args.path} under profile {profile.name}{picked}", show_header=False)
    table.add_column("what")
    table.add_column("planned", overflow="fold")  # a profile's path is one long word: wrap it, never cut it
    rows = result.rows()
    if has_weights(path):  # what the file holds, as `info` shows it, beside what the plan makes of it
        rows[2:2] = weight_rows(open_checkpoint(path).weights_by_kind())
    for label, value in rows:
        table.add_row(Text(label), Text(value))
    stdout.print(table)
    stdout.print(Text(result.explain()))
    return 0


def has_weights(path) -> bool:
    """A GGUF file, or a directory with safetensors beside its config.json (headers only are read)."""
    p = Path(path)
    return is_gguf(p) or (p.is_dir() and any(p.glob("*.safetensors")))
