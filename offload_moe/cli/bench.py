"""`offload-moe bench`: the engine against its baselines and its lower bound, one row per configuration.

Results table on stdout, progress on stderr, every field in `--json OUT` (schema: docs/trace-format.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..bench import BenchOptions, run_bench
from ..placement.options import Placement
from ..base.errors import OffloadMoeError
from ..base.runtime import DEMO_DIR
from ..checkpoints.synthetic import KNOWN_MODELS, SyntheticCheckpoint
from ..base.user_files import refuse_existing, write_text
from .common import MODEL_HELP, add_threads_argument, check_model_argument, fetch
from .console import human_bytes, progress_bar, stderr, stdout


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="measure the expert engine against baselines and a lower bound",
        description="Run the same tokens through several configurations (the engine as configured, all "
                    "experts resident, on-demand loading, LRU without prefetch, Hugging Face accelerate "
                    "offload) and report speed, hit rates, bytes moved, memory, and each row's decode time "
                    "against a lower bound computed from this run's own measurements.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH_OR_ID", help=MODEL_HELP)
    src.add_argument("--synthetic", metavar="NAME", choices=sorted(KNOWN_MODELS),
                     help=f"random weights with a known model's shapes ({', '.join(sorted(KNOWN_MODELS))}; "
                          "default: none, the --model checkpoint)")
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="with --synthetic: keep N layers (default: all of the model's)")
    p.add_argument("--scale", type=float, default=1.0, metavar="S",
                   help="with --synthetic: shrink widths by S (0 < S <= 1), for the CPU (default 1.0)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=None, metavar="B",
                   help="with --synthetic: experts and attention quantized to B bits (2, 3, 4 or 8), made "
                        "directly in packed form (fast at full size; default: float weights)")
    p.add_argument("--profile", metavar="P", default=None,
                   help="take cache slots, prefetch and the VRAM limit from this profile (name or .toml; "
                        "default: none)")
    p.add_argument("--vram-limit", metavar="SIZE", default=None,
                   help="cap this process's GPU memory, e.g. 12GB (not applicable on the CPU; default: no cap)")
    p.add_argument("--tokens", type=int, default=32, metavar="N", help="tokens generated per row (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=16, metavar="N", help="prompt length (default 16)")
    routing = p.add_mutually_exclusive_group()
    routing.add_argument("--trace", metavar="FILE",
                         help="replay this routing trace (offload-moe-trace/1; default: the model's routers decide)")
    routing.add_argument("--trace-reuse", type=float, default=None, metavar="R",
                         help="replay a synthetic trace in which an expert used at one token is used again "
                              "at the next with probability R (default: no synthetic trace)")
    p.add_argument("--guess-accuracy", default="0.8", metavar="A",
                   help="under replay, prefetch guesses are emulated: the true next route with each id kept "
                        "with probability A (default 0.8); 'router' uses the model's routers instead")
    p.add_argument("--cache-slots", default=None, metavar="K",
                   help="engine slots per layer ('all' or a number; default: max(top_k, experts / 2))")
    p.add_argument("--prefetch", type=int, default=None, metavar="D", help="engine prefetch depth (default 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    add_threads_argument(p)
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="prompt, synthetic trace and guess seed (default 0)")
    p.add_argument("--json", metavar="OUT", default=None,
                   help="write every measured field to this JSON file (default: none)")
    p.add_argument("--force", action="store_true", help="let --json replace an existing file")
    p.add_argument("--no-baselines", action="store_true", help="run the configured engine only")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="rounds of every row, interleaved; each row shows its median run and the spread (default 3)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw hit rate against slots (with Belady's curve) and decode speed against the "
                        "bound into this PNG (needs the 'plot' extra: matplotlib; default: no plot)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.repeats < 1:
        raise OffloadMoeError(f"--repeats {args.repeats}: expected an integer >= 1")
    if args.synthetic:
        source = SyntheticCheckpoint(args.synthetic, layers=args.layers, scale=args.scale, seed=args.seed,
                                     bits=args.bits)
    else:
        if args.layers is not None or args.scale != 1.0 or args.bits is not None:
            raise OffloadMoeError("--layers, --scale and --bits apply to --synthetic models only")
        check_model_argument(args)
        source = fetch(args.model) or DEMO_DIR  # a Hugging Face repo id: from the cache, else downloaded
        if args.model is None and not (DEMO_DIR / "config.json").exists():
            raise OffloadMoeError(f"{DEMO_DIR}: the bundled demo model is missing; give --model or --synthetic")
    slots = args.cache_slots
    if slots is not None and slots != "all":
        if not slots.isdigit():
            raise OffloadMoeError(f"--cache-slots {slots!r}: expected 'all' or a number")
        slots = int(slots)
    if args.guess_accuracy == "router":
        guess = None
    else:
        try:
            guess = float(args.guess_accuracy)
        except ValueError:
            raise OffloadMoeError(f"--guess-accuracy {args.guess_accuracy!r}: expected a probability or 'router'") \
                from None
    if args.json:
        out = Path(args.json)
        if out.parent and not out.parent.is_dir():
            raise OffloadMoeError(f"--json {out}: directory {out.parent} does not exist")
        refuse_existing(out, args.force)  # before the run, not after it
    if args.plot:
        check_plot_target(args.plot)
    with progress_bar() as report:
        options = BenchOptions(tokens=args.tokens, prompt_tokens=args.prompt_tokens, trace=args.trace,
                               trace_reuse=args.trace_reuse, guess_accuracy=guess, vram_limit=args.vram_limit,
                               seed=args.seed, baselines=not args.no_baselines, repeats=args.repeats)
        result = run_bench(source, options, Placement(cache_slots=slots, prefetch=args.prefetch),
                           device=args.device, dtype=args.dtype, profile=args.profile, progress=report)
    # the tables fit 80 columns; a pipe or file gets them at 120 (rich would otherwise assume 80)
    out = stdout if stdout.is_terminal else Console(soft_wrap=True, width=120, color_system=None)
    for table in results_tables(result):
        out.print(table)
    for line in summary_lines(result):
        out.print(Text(line))
    for line in result["notes"]:   # logs, not results: stderr
        stderr.print(Text(line if line.startswith("warning: ") else f"note: {line}"), highlight=False)
    if args.plot:
        path = plot_result(result, args.plot)
        stderr.print(Text(f"plot written to {path}"), highlight=False)
    if args.json:
        write_text(args.json, json.dumps(result, indent=1) + "\n", force=args.force, what="--json results")
    return 0


def _num(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _bytes(v) -> str:
    return "-" if v is None else human_bytes(v)


SHORT = {"engine": "engine", "resident": "resident", "on_demand": "on demand", "lru": "LRU", "accelerate": "accelerate"}


def short_label(row: dict) -> str:
    return SHORT.get(row["name"], row["name"])


def results_tables(result: dict) -> list[Table]:
    """Two tables that each fit 80 columns: speed against the bound, then experts and memory."""
    m = result["model"]
    title = (f"{Path(m['source']).name or m['source']}: {m['num_layers']} layers x {m['num_experts']} experts "
             f"(top-{m['top_k']}), {human_bytes(m['bytes_per_expert'])}/expert, {result['device']['type']}")
    runs = result["settings"].get("repeats") or 1
    speed = Table(title=f"{title}; median of {runs} run{'s' * (runs != 1)}", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for name in ("row", "prefill/s", "TTFT s", "decode/s", "min-max", "spread", "bound s", "ratio"):
        speed.add_column(name, justify="left" if name == "row" else "right", no_wrap=True)
    moves = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name in ("row", "hit rate", "prefetch", "moved", "GB/s", "peak VRAM", "peak RSS"):
        moves.add_column(name, justify="left" if name == "row" else "right", no_wrap=True)
    for row in result["rows"]:
        label = Text(short_label(row))
        if row["status"] != "ok":
            speed.add_row(label, "skipped", *[""] * 6)
            continue
        lo, hi = row.get("decode_tokens_per_second_min"), row.get("decode_tokens_per_second_max")
        speed.add_row(label, _num(row["prefill_tokens_per_second"]), _num(row["ttft_seconds"], "{:.3f}"),
                      _num(row["decode_tokens_per_second"], "{:.2f}"),
                      "-" if lo is None else f"{lo:.1f}-{hi:.1f}", _num(row.get("spread"), "{:.0%}"),
                      _num(row["bound_seconds"], "{:.3f}"), _num(row["ratio"], "{:.2f}"))
        issued = row["prefetch_issued"]
        moves.add_row(label, _num(row["hit_rate"], "{:.3f}"), _num(row["prefetch_accuracy"] if issued else None,
                                                                   "{:.3f}"),
                      _bytes(row["bytes_moved"]), _num(row["achieved_gbps"], "{:.2f}"),
                      _bytes(row["peak_vram_bytes"]), _bytes(row["peak_rss_bytes"]))
    return [speed, moves]


def summary_lines(result: dict) -> list[str]:
    mc, b, c, r = result["memcpy"], result["belady"], result["compute_reference"], result["routing"]
    lines = [f"{short_label(row)}: {row['label']}" for row in result["rows"] if short_label(row) != row["label"]]
    rounds = mc.get("rounds", 1)
    lines.append(f"memcpy peak ({mc['kind']}, {human_bytes(mc['bytes'])} x {mc['repeats']}, best of "
                 f"{mc['trials'] * rounds} trials in {rounds} round{'s' * (rounds != 1)}): "
                 f"{mc.get('memcpy_peak_gbps', mc['peak_gbps']):.2f} GB/s (median {mc['median_gbps']:.2f})")
    if mc.get("row_peak_gbps") and mc["row_peak_gbps"] > mc.get("memcpy_peak_gbps", mc["peak_gbps"]):
        lines.append(f"the rows' own copies reached {mc['row_peak_gbps']:.2f} GB/s: the bound uses that rate")
    if r["kind"] == "router":
        lines.append("routing: the model's own routers")
    else:
        what = f"synthetic trace, reuse {r['reuse']}" if r["kind"] == "synthetic" else f"trace {r['file']}"
        guess = (f"prefetch guesses emulated at accuracy {r['guess_accuracy']}" if r["guess"] == "emulated"
                 else "prefetch guesses from the routers")
        lines.append(f"routing: {what} ({r['trace_tokens']} tokens); {guess}")
    if b["belady_hit_rate"] is not None:
        frac = "-" if b["lru_fraction_of_belady"] is None else f"{b['lru_fraction_of_belady']:.3f}"
        lru = "the LRU row's" if b["from_row"] == "lru" else "LRU simulated on the engine's routing:"
        lines.append(f"Belady hit rate with {b['slots']} slots (the best any eviction policy reaches loading on "
                     f"demand; prefetch hits can beat it): {b['belady_hit_rate']:.3f}; {lru} "
                     f"{b['lru_hit_rate']:.3f} = {frac} of it")
    if c["decode_seconds"] is not None:
        lines.append(f"bound = max(decode bytes copied / peak copy rate, compute {c['decode_seconds']:.3f} s = decode "
                     f"steps x the {c['source']}); ratio = measured decode time / bound")
    else:
        lines.append(f"no lower bound: {c['note']}")
    lines.extend(f"{row['label']}: skipped: {row['reason']}" for row in result["rows"] if row["status"] != "ok")
    if result["same_tokens"] is False:
        lines.append("warning: the configurations did not all generate the same tokens")
    return lines


def check_plot_target(path: str) -> None:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise OffloadMoeError(f"--plot {path}: expected a .png file name")
    if not out.parent.is_dir():
        raise OffloadMoeError(f"--plot {path}: directory {out.parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OffloadMoeError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                              "(or '.[plot]' in a clone)") from None


def plot_result(result: dict, path: str) -> Path:
    from ..bench.plot import plot_bench

    try:
        return plot_bench(result, path)
    except OSError as e:
        raise OffloadMoeError(f"--plot {path}: cannot write ({e.strerror or e})") from None
