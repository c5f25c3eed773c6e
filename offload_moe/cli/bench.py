"""`offload-moe bench`: the engine against its baselines and its lower bound, one row per configuration.

Results table on stdout, progress on stderr, every field in `--json OUT` (schema: docs/trace-format.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..bench import run_bench
from ..errors import OffloadMoeError
from ..runtime import DEMO_DIR
from ..synthetic import KNOWN_MODELS, SyntheticCheckpoint
from ..user_files import refuse_existing, write_text
from .common import MODEL_HELP, add_threads_argument, fetch
from .console import human_bytes, progress_bar, stdout


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
                     help=f"random weights with a known model's shapes ({', '.join(sorted(KNOWN_MODELS))})")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="with --synthetic: keep N layers")
    p.add_argument("--scale", type=float, default=1.0, metavar="S",
                   help="with --synthetic: shrink widths by S (0 < S <= 1), for the CPU")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=None, metavar="B",
                   help="with --synthetic: experts and attention quantized to B bits (2, 3, 4 or 8), made "
                        "directly in packed form (fast at full size)")
    p.add_argument("--profile", metavar="P", default=None,
                   help="take cache slots, prefetch and the VRAM limit from this profile (name or .toml)")
    p.add_argument("--vram-limit", metavar="SIZE", default=None,
                   help="cap this process's GPU memory, e.g. 12GB (not applicable on the CPU)")
    p.add_argument("--tokens", type=int, default=32, metavar="N", help="tokens generated per row (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=16, metavar="N", help="prompt length (default 16)")
    routing = p.add_mutually_exclusive_group()
    routing.add_argument("--trace", metavar="FILE", help="replay this routing trace (offload-moe-trace/1)")
    routing.add_argument("--trace-reuse", type=float, default=None, metavar="R",
                         help="replay a synthetic trace in which an expert used at one token is used again "
                              "at the next with probability R")
    p.add_argument("--guess-accuracy", default="0.8", metavar="A",
                   help="under replay, prefetch guesses are emulated: the true next route with each id kept "
                        "with probability A (default 0.8); 'router' uses the model's routers instead")
    p.add_argument("--cache-slots", default=None, metavar="K", help="engine slots per layer ('all' or a number)")
    p.add_argument("--prefetch", type=int, default=None, metavar="D", help="engine prefetch depth (default 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    add_threads_argument(p)
    p.add_argument("--seed", type=int, default=0, metavar="S", help="prompt, synthetic trace and guess seed")
    p.add_argument("--json", metavar="OUT", default=None, help="write every measured field to this JSON file")
    p.add_argument("--force", action="store_true", help="let --json replace an existing file")
    p.add_argument("--no-baselines", action="store_true", help="run the configured engine only")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.synthetic:
        source = SyntheticCheckpoint(args.synthetic, layers=args.layers, scale=args.scale, seed=args.seed,
                                     bits=args.bits)
    else:
        if args.layers is not None or args.scale != 1.0 or args.bits is not None:
            raise OffloadMoeError("--layers, --scale and --bits apply to --synthetic models only")
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
    with progress_bar() as report:
        result = run_bench(source, device=args.device, dtype=args.dtype, tokens=args.tokens,
                           prompt_tokens=args.prompt_tokens, trace=args.trace, trace_reuse=args.trace_reuse,
                           guess_accuracy=guess, vram_limit=args.vram_limit, cache_slots=slots,
                           prefetch=args.prefetch, profile=args.profile, seed=args.seed,
                           baselines=not args.no_baselines, progress=report)
    # a pipe or file gets the whole table (rich would wrap it to 80 columns); a terminal its own width
    out = stdout if stdout.is_terminal else Console(soft_wrap=True, width=200)
    out.print(results_table(result))
    for line in summary_lines(result):
        out.print(Text(line))
    if args.json:
        write_text(args.json, json.dumps(result, indent=1) + "\n", force=args.force, what="--json results")
    return 0


def _num(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _bytes(v) -> str:
    return "-" if v is None else human_bytes(v)


def results_table(result: dict) -> Table:
    m = result["model"]
    title = (f"{m['source']}: {m['num_layers']} layers x {m['num_experts']} experts (top-{m['top_k']}), "
             f"{human_bytes(m['bytes_per_expert'])}/expert, {result['device']['type']} "
             f"({result['device']['name']})")
    table = Table(title=title, show_header=True)
    for name, justify in (("configuration", "left"), ("prefill tok/s", "right"), ("TTFT s", "right"),
                          ("decode tok/s", "right"), ("hit rate", "right"), ("prefetch acc", "right"),
                          ("moved", "right"), ("GB/s", "right"), ("peak VRAM", "right"), ("peak RSS", "right"),
                          ("bound s", "right"), ("ratio", "right")):
        table.add_column(name, justify=justify)
    for row in result["rows"]:
        if row["status"] != "ok":
            table.add_row(Text(row["label"]), "skipped", *[""] * 10)
            continue
        issued = row["prefetch_issued"]
        table.add_row(
            Text(row["label"]), _num(row["prefill_tokens_per_second"]), _num(row["ttft_seconds"], "{:.3f}"),
            _num(row["decode_tokens_per_second"], "{:.2f}"), _num(row["hit_rate"], "{:.3f}"),
            _num(row["prefetch_accuracy"] if issued else None, "{:.3f}"), _bytes(row["bytes_moved"]),
            _num(row["achieved_gbps"], "{:.2f}"), _bytes(row["peak_vram_bytes"]), _bytes(row["peak_rss_bytes"]),
            _num(row["bound_seconds"], "{:.3f}"), _num(row["ratio"], "{:.2f}"))
    return table


def summary_lines(result: dict) -> list[str]:
    mc, b, c, r = result["memcpy"], result["belady"], result["compute_reference"], result["routing"]
    lines = [f"memcpy peak ({mc['kind']}, {human_bytes(mc['bytes'])} x {mc['repeats']}, best of {mc['trials']}): "
             f"{mc['peak_gbps']:.2f} GB/s"]
    if r["kind"] == "router":
        lines.append("routing: the model's own routers")
    else:
        what = f"synthetic trace, reuse {r['reuse']}" if r["kind"] == "synthetic" else f"trace {r['file']}"
        guess = (f"prefetch guesses emulated at accuracy {r['guess_accuracy']}" if r["guess"] == "emulated"
                 else "prefetch guesses from the routers")
        lines.append(f"routing: {what} ({r['trace_tokens']} tokens); {guess}")
    if b["belady_hit_rate"] is not None:
        frac = "-" if b["lru_fraction_of_belady"] is None else f"{b['lru_fraction_of_belady']:.3f}"
        lines.append(f"Belady (optimal) hit rate with {b['slots']} slots: {b['belady_hit_rate']:.3f}; "
                     f"LRU {b['lru_hit_rate']:.3f} = {frac} of it")
    if c["decode_seconds"] is not None:
        lines.append(f"bound = decode misses x bytes/expert / memcpy peak + compute {c['decode_seconds']:.3f} s "
                     f"(decode steps x the fastest step of the {c['source']}); ratio = measured decode time / bound")
    else:
        lines.append(f"no lower bound: {c['note']}")
    lines.extend(f"{row['label']}: skipped: {row['reason']}" for row in result["rows"] if row["status"] != "ok")
    if result["same_tokens"] is False:
        lines.append("warning: the configurations did not all generate the same tokens")
    lines.extend(f"note: {n}" for n in result["notes"])
    return lines
