"""`offload-moe tune`: measure this machine, try a few engine settings, save the best as a profile.

Progress goes to stderr; the measurements, one table row per setting and the path of the written
profile go to stdout. The measured link and expert-compute figures are also saved as this
machine's cost model (`experts/costs.py`), which the hybrid engine reads at load instead of
measuring. An existing profile is never overwritten without --force (checked before
anything is measured, and again when writing).
"""

from __future__ import annotations

import torch
from rich.table import Table
from rich.text import Text

from ..base.runtime import fmt_bytes, parse_bytes
from ..base.errors import OffloadMoeError
from ..tune import (DISK_TEST_BYTES, TuneOptions, cost_model, measurement_lines, parse_settings, profile_path, tune,
                    write_profile)
from .common import MODEL_HELP, add_threads_argument, check_model_argument, fetch
from .console import progress_bar, stderr, stdout


def add_parser(sub):
    p = sub.add_parser(
        "tune", help="measure this machine and write the fastest engine settings as a profile",
        description="Measure host→device and disk bandwidth and one expert's compute time per bit width, "
                    "then decode a few tokens with the model under a few settings (slots per layer, "
                    "prefetch depth, RAM or disk tier) and write the fastest as a profile "
                    "(default: tuned, in $XDG_CONFIG_HOME/offload-moe/profiles), so --profile tuned uses it.")
    p.add_argument("--model", metavar="PATH_OR_ID", help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--name", default="tuned", metavar="NAME", help="profile name to write (default: tuned)")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="tokens to decode per setting (default: 32 on the CPU, 64 on a GPU)")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="directory to write NAME.toml in (default: the user profile directory)")
    p.add_argument("--force", action="store_true", help="overwrite an existing profile of that name")
    p.add_argument("--settings", default=None, metavar="LIST",
                   help="settings to try instead of the default search, as SLOTS:PREFETCH:TIER,... "
                        "(e.g. 2:0:ram,4:1:disk)")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="where the disk test and the disk tier write (default: the temp directory)")
    p.add_argument("--disk-test", default=None, metavar="SIZE",
                   help=f"size of the disk read test file (default: {DISK_TEST_BYTES // 10**6}MB)")
    p.add_argument("--seconds-per-setting", type=float, default=None, metavar="S",
                   help="decode time limit of one setting (default: 8 on the CPU, 20 on a GPU)")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_model_argument(args)
    target = profile_path(args.name, args.output)  # a bad name or an existing file fails before measuring
    if target.exists() and not args.force:
        raise OffloadMoeError(f"{target} exists; pass --force to overwrite it, or choose another --name")
    settings = parse_settings(args.settings) if args.settings else None
    disk_bytes = parse_bytes(args.disk_test) if args.disk_test else DISK_TEST_BYTES
    model = fetch(args.model)  # a Hugging Face repo id: from the cache, else downloaded
    with progress_bar() as report:
        options = TuneOptions(tokens=args.tokens, settings=settings, offload_dir=args.offload_dir,
                              disk_bytes=disk_bytes, setting_seconds=args.seconds_per_setting)
        result = tune(model, options, device=args.device, progress=report)
    path = write_profile(result, args.name, args.output, force=args.force)
    costs = cost_model(result.measurements, source=f"offload-moe tune, {result.date}")
    costs_file = None
    if costs is not None:
        from ..experts.cost_file import save_costs
        try:
            costs_file = save_costs(costs, torch.device(result.device))
        except OSError as e:  # the profile is written; the engine can still measure at load
            stderr.print(Text(f"offload-moe: warning: cost model not saved ({e})"))

    stdout.print(Text(f"{result.model} ({result.model_summary})"))
    for line in measurement_lines(result.measurements):
        stdout.print(Text(f"  {line}"))
    table = Table(title=f"{result.tokens} tokens per setting, greedy, after a {result.prompt_tokens}-token prompt")
    for name, justify in (("slots", "right"), ("prefetch", "right"), ("tier", "left"), ("tok/s", "right"),
                          ("hit rate", "right"), ("bytes moved", "right"), ("", "left")):
        table.add_column(name, justify=justify)
    for r in result.rows:
        if r.error:
            table.add_row(str(r.slots), str(r.prefetch), r.tier, "-", "-", "-", r.error)
            continue
        mark = "best" if r is result.best else ("time limit" if r.timed_out else "")
        table.add_row(str(r.slots), str(r.prefetch), r.tier, f"{r.decode_tokens_per_second:.1f}",
                      f"{r.hit_rate:.1%}", fmt_bytes(r.bytes_moved), mark)
    stdout.print(table)
    for note in result.notes:
        stderr.print(Text(f"note: {note}"), highlight=False)
    if result.skipped:
        stderr.print(Text(f"note: {result.skipped} setting(s) skipped: the time budget ran out"), highlight=False)
    if costs_file is not None:
        stdout.print(Text(f"cost model for the hybrid CPU/GPU engine saved to {costs_file}"))
    use = args.name if args.output is None else str(path)
    b = result.best
    stdout.print(Text(f"wrote {path} in {result.seconds:.1f} s: {b.slots} slots per layer, prefetch {b.prefetch}, "
                      f"{b.tier} tier ({b.decode_tokens_per_second:.1f} tok/s); use it with --profile {use}"))
    return 0
