"""`run_bench`: check the arguments, fix the routing and the prompt every row shares, run the rows in
order, then add the lower bounds and assemble the JSON-ready result (see the package docstring)."""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import __version__
from ..base.runtime import Progress, place, resolve_device, resolve_dtype
from ..api.sources import open_checkpoint
from ..base.errors import OffloadMoeError
from ..placement.options import Placement
from ..experts.layout import ExpertLayout
from ..model.expert_interface import ExpertWeights
from ..tools.trace import Trace, load_trace, synthesize
from .bounds import add_bounds, belady_summary
from .hf_offload import run_accelerate
from .measure import device_info, measure_memcpy
from .repeat import combine, fastest_copy_gbps, fastest_step, merge_memcpy
from .repeat import warnings as spread_warnings
from .rows import LABELS, Run, compute_reference, fits_all_experts, run_ours, skipped_row
from .settings import apply_vram_limit, resolve_settings, show_slots

FORMAT = "offload-moe-bench/1"


@dataclass(frozen=True)
class BenchOptions:
    """What a bench run measures (the engine row's placement is a `Placement` beside it).

    tokens: tokens generated per row (greedy, EOS ignored); prompt_tokens: prompt length (seeded
    random ids). trace: a `Trace` or trace file to replay; trace_reuse: synthesize one with that
    reuse probability instead; neither: the model's own routers decide. guess_accuracy: under replay,
    the accuracy of the emulated prefetch guess (None: the model's routers guess). vram_limit: bytes
    or "12GB", applied with `torch.cuda.set_per_process_memory_fraction` on CUDA (recorded as not
    applicable on the CPU). baselines=False runs the engine row only. repeats: rounds of every row,
    interleaved (each row reports its median run and the spread; see repeat.py)."""
    tokens: int = 32
    prompt_tokens: int = 16
    trace: Trace | str | Path | None = None
    trace_reuse: float | None = None
    guess_accuracy: float | None = 0.8
    vram_limit: int | str | None = None
    seed: int = 0
    baselines: bool = True
    repeats: int = 3

    def check(self) -> None:
        for name in ("tokens", "prompt_tokens", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OffloadMoeError(f"{name} = {v!r}, expected an integer >= 1")
        if self.trace is not None and self.trace_reuse is not None:
            raise OffloadMoeError("give a trace file or a reuse probability to synthesize one, not both")
        g = self.guess_accuracy
        if g is not None and not (isinstance(g, (int, float)) and 0 <= g <= 1):
            raise OffloadMoeError(f"guess accuracy = {g!r}, expected a probability from 0 to 1")


def run_bench(source, options: BenchOptions | None = None, placement: Placement | None = None, *,
              device: str = "auto", dtype=None, profile: str | None = None,
              progress: Progress | None = None) -> dict:
    """Benchmark `source` (a checkpoint directory, or an opened `Checkpoint` / `SyntheticCheckpoint`)
    as `options` says and return the results as a JSON-ready dict (schema: docs/trace-format.md).

    placement: the engine row's `cache_slots` and `prefetch` (default: from `profile` when given, else
    max(top_k, num_experts // 2) slots and prefetch 1), `offload`, `ram_budget`, `offload_dir` and
    `cpu_experts` (None: load's default; the baselines always copy, "none"); other fields are ignored.
    """
    opts = options or BenchOptions()
    placement = placement or Placement()
    report = progress or (lambda what, done, total: None)
    notes: list[str] = []
    opts.check()

    ckpt = source if hasattr(source, "expert") else open_checkpoint(source)
    cfg = ckpt.config
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, cfg.torch_dtype)
    context = opts.prompt_tokens + opts.tokens
    if context > cfg.max_position_embeddings:
        raise OffloadMoeError(f"prompt_tokens + tokens = {context} exceed the model's "
                              f"{cfg.max_position_embeddings} positions")
    slots, prefetch, limit = resolve_settings(cfg, device, dtype, placement.cache_slots, placement.prefetch, profile,
                                              opts.vram_limit, notes)
    before = torch.cuda.get_per_process_memory_fraction(device) if device.type == "cuda" else None
    vram = apply_vram_limit(limit, device, notes)
    scratch = offload_dir = None
    if placement.offload_dir is None:  # one folder for every row's disk tier (if any), removed at the end
        offload_dir = scratch = tempfile.mkdtemp(prefix="offload-moe-bench-")
    engine = replace(placement, cache_slots=slots, prefetch=prefetch, offload_dir=placement.offload_dir or offload_dir)
    try:
        return _bench(ckpt, device, dtype, opts, engine, Limits(profile, limit, vram), report, notes)
    finally:
        if before is not None:
            torch.cuda.set_per_process_memory_fraction(before, device)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class Limits:
    profile: object          # the profile the engine row's settings came from (a name, a Profile, None)
    limit: int | None        # the VRAM limit asked for, bytes
    vram: dict               # what apply_vram_limit did


def _bench(ckpt, device, dtype, opts: BenchOptions, engine: Placement, limits: Limits, report, notes) -> dict:
    cfg = ckpt.config
    tokens, prompt_tokens, seed, repeats = opts.tokens, opts.prompt_tokens, opts.seed, opts.repeats
    slots, prefetch, profile, limit = engine.cache_slots, engine.prefetch, limits.profile, limits.limit
    synthetic = not Path(ckpt.path).exists()
    context = prompt_tokens + tokens
    moe_layers = list(cfg.moe_layers)   # the engine numbers these 0, 1, ...
    trace, routing = _routing(cfg, len(moe_layers), context, opts, synthetic, notes)

    g = torch.Generator().manual_seed(seed)
    low = min(3, cfg.vocab_size - 1)
    prompt = torch.randint(low, cfg.vocab_size, (prompt_tokens,), generator=g).tolist()
    run = Run(ckpt, synthetic, cfg, len(moe_layers), device, dtype, prompt, tokens, context, trace,
              opts.guess_accuracy if trace is not None else None, seed, engine.offload, engine.ram_budget,
              engine.offload_dir, profile, limit if device.type == "cuda" else None, engine.cpu_experts, report)

    first = ckpt.expert(moe_layers[0], 0)
    bytes_per_expert = ExpertLayout(ExpertWeights(**{k: place(v, "cpu", dtype) for k, v in first.items()})).nbytes
    del first
    # warm-up: one short throwaway generation, so that one-time costs (kernel loading and autotuning,
    # allocator growth, lazy imports) fall on no row
    t0 = time.perf_counter()
    run_ours(replace(run, prompt=prompt[:4], tokens=2, report=lambda *a: None), "warmup", "warm-up",
             cache_slots=slots, prefetch=prefetch, policy="lru", guess=True, engine=True)
    warmup_seconds = time.perf_counter() - t0

    plan = ["engine"] + (["resident", "on_demand", "lru", "accelerate"] if opts.baselines else [])
    runs: dict[str, list[dict]] = {name: [] for name in plan}
    memcpy_rounds = []
    dense_bytes, wrapped, fits, curve = None, False, None, None
    for rep in range(repeats):   # rounds: every row once per round, so load bursts hit all rows alike
        report("memcpy", rep, repeats)
        memcpy_rounds.append(measure_memcpy(bytes_per_expert, device))
        for i, name in enumerate(plan):
            report("bench", rep * len(plan) + i, repeats * len(plan))
            label = LABELS[name].format(slots=show_slots(slots), prefetch=prefetch)
            if name == "engine":
                row = run_ours(run, name, label, cache_slots=slots, prefetch=prefetch, policy="lru", guess=True,
                               engine=True)
                dense_bytes = row.pop("_dense_bytes", None) or dense_bytes
                curve = row.pop("_curve", None) or curve
            elif name == "resident":
                if fits is None:
                    fits = fits_all_experts(run, dense_bytes, bytes_per_expert)
                row = (run_ours(run, name, label, cache_slots="all", prefetch=0, policy="lru", guess=False)
                       if fits[0] else skipped_row(name, label, fits[1], {"experts": "resident"}))
            elif name == "on_demand":
                row = run_ours(run, name, label, cache_slots=cfg.top_k, prefetch=0, policy="none", guess=False)
            elif name == "lru":
                row = run_ours(run, name, label, cache_slots=slots, prefetch=0, policy="lru", guess=False)
            else:
                if rep and runs[name][0]["status"] != "ok":
                    row = runs[name][0]   # skipped once (no CUDA, no accelerate): skipped every round
                else:
                    engine_run = runs["engine"][-1]
                    budget = limit if (limit and device.type == "cuda") else engine_run.get("peak_vram_bytes")
                    row = run_accelerate(run, name, label, budget)
            row.pop("_dense_bytes", None)
            wrapped = row.pop("_wrapped", False) or wrapped
            runs[name].append(row)
            report("bench", rep * len(plan) + i + 1, repeats * len(plan))
    report("memcpy", repeats, repeats)
    memcpy = merge_memcpy(memcpy_rounds)
    all_runs = [r for name in plan for r in runs[name]]
    rows = {name: combine(runs[name]) for name in plan}

    compute = compute_reference(run, rows, dense_bytes, bytes_per_expert, fastest_step(all_runs))
    reference_ids = rows["engine"].get("token_ids")
    for row in rows.values():
        if row["status"] == "ok":
            row["tokens_match_engine"] = row["token_ids"] == reference_ids if reference_ids is not None else None
    row_peak = fastest_copy_gbps(all_runs)
    memcpy["row_peak_gbps"] = row_peak
    memcpy["peak_gbps"] = max(memcpy["memcpy_peak_gbps"], row_peak or 0.0)
    add_bounds(rows, compute, memcpy["peak_gbps"], bytes_per_expert)
    notes.extend(f"warning: {w}" for w in spread_warnings(list(rows.values()), memcpy))

    belady = belady_summary(rows, slots)
    ok = [r for r in rows.values() if r["status"] == "ok" and r["name"] != "accelerate"]
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"offload_moe": __version__, "torch": torch.__version__},
        "model": {"source": str(ckpt.path), "synthetic": synthetic, "model_type": cfg.model_type,
                  "num_layers": cfg.num_layers,
                  "num_experts": cfg.num_experts, "top_k": cfg.top_k, "hidden_size": cfg.hidden_size,
                  "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
                  "dtype": str(dtype).removeprefix("torch."), "bytes_per_expert": bytes_per_expert,
                  "moe_layers": len(moe_layers),
                  "expert_bytes_total": bytes_per_expert * len(moe_layers) * cfg.num_experts},
        "device": device_info(device),
        "vram_limit": limits.vram,
        "settings": {"tokens": tokens, "prompt_tokens": prompt_tokens, "cache_slots": slots, "prefetch": prefetch,
                     "profile": getattr(profile, "name", profile), "offload": engine.offload, "seed": seed,
                     "baselines": opts.baselines, "repeats": repeats},
        "routing": routing | {"wrapped": routing["wrapped"] or wrapped},
        "memcpy": memcpy,
        "warmup_seconds": warmup_seconds,
        "compute_reference": compute,
        "belady": belady,
        "hit_rate_curve": curve,
        "same_tokens": all(r["token_ids"] == reference_ids for r in ok) if ok else None,
        "rows": [rows[name] for name in plan],
        "notes": notes,
    }


def _routing(cfg, moe_layers: int, context: int, opts: BenchOptions, synthetic: bool,
             notes: list[str]) -> tuple[Trace | None, dict]:
    """The routing every row shares: the trace to replay (loaded, synthesized, or None: the model's
    routers decide) and its description for the result."""
    trace, trace_reuse, guess_accuracy, seed = opts.trace, opts.trace_reuse, opts.guess_accuracy, opts.seed
    routing: dict = {"kind": "router", "file": None, "source": None, "trace_model": None, "trace_layers": None,
                     "trace_tokens": None, "reuse": None, "guess": "router", "guess_accuracy": None, "wrapped": False}
    if isinstance(trace, (str, Path)):
        routing["file"] = str(trace)
        trace = load_trace(trace)
    elif trace_reuse is not None:
        trace = synthesize(moe_layers, cfg.num_experts, cfg.top_k, context, trace_reuse, seed)
    if trace is not None:
        if (trace.num_experts, trace.top_k) != (cfg.num_experts, cfg.top_k):
            where = routing["file"] or "trace"
            raise OffloadMoeError(f"{where}: {trace.num_experts} experts, top-{trace.top_k}; the model has "
                                  f"{cfg.num_experts} experts, top-{cfg.top_k}")
        routing.update(kind="synthetic" if trace_reuse is not None else "trace", source=trace.source,
                       reuse=trace_reuse, trace_tokens=len(trace), trace_layers=trace.num_layers,
                       trace_model=trace.model)
        if guess_accuracy is not None:
            routing.update(guess="emulated", guess_accuracy=float(guess_accuracy))
            notes.append(f"Routing is replayed from the trace, so the routers' prefetch guesses would be "
                         f"noise; prefetch guesses are emulated: the true next route with each id kept with "
                         f"probability {guess_accuracy} (else a wrong expert).")
        if trace.num_layers != moe_layers:
            notes.append(f"The trace has {trace.num_layers} layers, the model {moe_layers} MoE layers: MoE "
                         f"layer l replays trace layer l % {trace.num_layers}.")
        if len(trace) < context - 1:
            notes.append(f"The trace has {len(trace)} tokens, fewer than the {context - 1} the run routes: "
                         "it wraps around.")
            routing["wrapped"] = True
    elif synthetic:
        notes.append("No trace: the synthetic model's random routers decide, which gives nearly uniform "
                     "routing with little reuse (use --trace or --trace-reuse for realistic locality).")
    return trace, routing
