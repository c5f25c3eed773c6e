"""`offload-moe plan PATH [--profile NAME_OR_PATH] [--hit-rate X]`: the memory plan, before any download."""

from __future__ import annotations

from dataclasses import replace

from rich.table import Table
from rich.text import Text

from ..planner import auto_profile, plan
from ..profiles import list_profiles, load_profile
from ..gguf.reader import is_gguf
from ..sources import load_config
from ..tune.disk import measure_file_read
from .common import fetch
from .console import stdout


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
    config = load_config(fetch(args.path, want="config"))  # a repo id: config.json alone is fetched
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
    table.add_column("planned")
    for label, value in result.rows():
        table.add_row(Text(label), Text(value))
    stdout.print(table)
    stdout.print(Text(result.explain()))
    return 0
