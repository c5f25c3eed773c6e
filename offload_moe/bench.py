"""`run_bench`: measure the offloading engine against its baselines and against a lower bound.

Every configuration ("row") runs the same weights on the same prompt and generates the same number
of tokens greedily; with a routing trace (a file, or `synthesize(reuse=...)`) every row also makes
the same expert choices, because `TraceRouter` replaces the routers' top-k. The rows:

- ``engine``: the offloading engine as configured (cache slots and prefetch depth given, or taken
  from a profile);
- ``resident``: every expert on the compute device (skipped with a reason when it does not fit);
- ``on_demand``: no reuse and no prefetch: each use copies its expert (policy "none", top_k slots);
- ``lru``: the configured slots with LRU eviction, no prefetch;
- ``accelerate``: transformers' MixtralForCausalLM with Hugging Face accelerate ``device_map``
  offload (only for a real checkpoint directory on CUDA with accelerate installed; otherwise the
  row says why it was skipped).

Measured per row: prefill tokens/s, time to first token, decode tokens/s, hits, misses, hit rate,
prefetch accuracy, bytes moved, the time spent copying, the achieved host→device rate, peak VRAM
and peak RSS. Once per run: the memcpy peak (one expert-sized buffer copied repeatedly: pinned
host→device on CUDA, RAM→RAM on the CPU), and the Belady (optimal) hit rate of the recorded
routing for the same slots, with LRU's hit rate as a fraction of it.

Lower bound of a row's decode time (the tokens after the first), from this run's own measurements:

    bound = decode misses × bytes per expert ÷ memcpy peak + compute time

compute time is the resident row's decode time, taken as (tokens - 1) × its fastest decode step so
that preempted steps do not inflate the bound (if the resident row could not run: the same
from a slots="all" engine run, when that fits; otherwise the bound is null and the reason is given).
So the bound is the decode time if every expert computed as fast as when resident and every missed
expert crossed at the peak copy rate without overlapping anything. ratio = measured decode time ÷
bound: near 1 the row is as fast as its misses allow; a ratio below 1 means copies overlapped
compute (the engine computes resident experts while misses copy), or noise.

Definitions used in the output (the JSON schema is in docs/trace-format.md):

- ``copy_seconds``: the summed duration of every host→device expert copy the engine made (demand and
  prefetch). On CUDA each copy is bracketed by timing events on the engine's copy stream, from the
  moment its slot is free to the copy's end; on the CPU copies are synchronous and wall-clock timed.
- ``achieved_gbps`` = bytes_moved ÷ copy_seconds ÷ 1e9 (decimal GB/s).
- ``stall_seconds``: the time compute waited for demand copies (the engine's own counter).
- ``ttft_seconds``: from submitting the prompt to the first generated token id read on the host
  (equal to ``prefill_seconds``).

Nothing here prints; progress goes through the `progress(what, done, total)` callback.
"""

from __future__ import annotations

import datetime
import gc
import importlib.util
import inspect
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import __version__
from .api import Progress, resolve_device, resolve_dtype
from .checkpoint import Checkpoint
from .errors import OffloadMoeError
from .experts.layout import ExpertLayout
from .experts.policy import LRU, Belady, simulate
from .experts.weights import ExpertWeights
from .generate import DecodeTiming, Sampling, decode_tokens
from .loader import _to, apply_profile, load
from .profiles import Profile, available_ram, load_profile, parse_bytes
from .trace import Trace, TraceRouter, load_trace, synthesize

FORMAT = "offload-moe-bench/1"

ROW_FIELDS = (
    "name", "label", "status", "reason", "settings",
    "prompt_tokens", "new_tokens", "load_seconds",
    "prefill_seconds", "ttft_seconds", "prefill_tokens_per_second",
    "decode_seconds", "decode_tokens_per_second", "decode_step_min_seconds", "decode_step_median_seconds",
    "hits", "misses", "hit_rate", "decode_hits", "decode_misses", "decode_hit_rate",
    "prefetch_issued", "prefetch_used", "prefetch_accuracy", "cpu_computed",
    "bytes_per_expert", "bytes_moved", "decode_bytes_moved",
    "stall_seconds", "decode_stall_seconds", "copy_seconds", "decode_copy_seconds", "achieved_gbps",
    "peak_vram_bytes", "peak_rss_bytes",
    "belady_hit_rate", "lru_hit_rate_simulated", "lru_fraction_of_belady",
    "bound_transfer_seconds", "bound_compute_seconds", "bound_seconds", "ratio",
    "token_ids", "tokens_match_engine",
)

LABELS = {
    "engine": "engine (slots {slots}, prefetch {prefetch})",
    "resident": "all experts resident",
    "on_demand": "on demand (no cache, no prefetch)",
    "lru": "LRU cache (slots {slots}, no prefetch)",
    "accelerate": "HF accelerate device_map offload",
}


@dataclass
class _Run:
    """What every row shares."""
    ckpt: object
    synthetic: bool
    cfg: object
    moe_layers: int            # layers with routed experts (the engine's layers)
    device: torch.device
    dtype: torch.dtype
    prompt: list[int]
    tokens: int
    context: int
    trace: Trace | None
    guess_accuracy: float | None
    seed: int
    offload: str
    ram_budget: object
    offload_dir: object
    profile: "str | Profile | None"
    vram_limit: int | None
    cpu_experts: object        # the engine row's load(cpu_experts=...); None: load's default
    report: Progress


def run_bench(source, *, device: str = "auto", dtype=None, tokens: int = 32, prompt_tokens: int = 16,
              trace: "Trace | str | Path | None" = None, trace_reuse: float | None = None,
              guess_accuracy: float | None = 0.8, vram_limit: "int | str | None" = None,
              cache_slots: "int | str | None" = None, prefetch: int | None = None, profile: str | None = None,
              offload: str | None = None, ram_budget=None, offload_dir=None, cpu_experts=None, seed: int = 0,
              baselines: bool = True, progress: Progress | None = None) -> dict:
    """Benchmark `source` (a checkpoint directory, or an opened `Checkpoint` / `SyntheticCheckpoint`)
    and return the results as a JSON-ready dict (schema: docs/trace-format.md).

    tokens: tokens generated per row (greedy, EOS ignored); prompt_tokens: prompt length (seeded
    random ids). trace: a `Trace` or trace file to replay; trace_reuse: synthesize one with that
    reuse probability instead; neither: the model's own routers decide. guess_accuracy: under replay,
    the accuracy of the emulated prefetch guess (None: the model's routers guess). cache_slots /
    prefetch: the engine row's settings (default: from `profile` when given, else
    max(top_k, num_experts // 2) slots and prefetch 1). vram_limit: bytes or "12GB", applied with
    `torch.cuda.set_per_process_memory_fraction` on CUDA (recorded as not applicable on the CPU).
    cpu_experts: the engine row's `load(cpu_experts=...)` (None: load's default; the baselines always
    copy, "none"). baselines=False runs the engine row only.
    """
    report = progress or (lambda what, done, total: None)
    notes: list[str] = []
    for name, v in (("tokens", tokens), ("prompt_tokens", prompt_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OffloadMoeError(f"{name} = {v!r}, expected an integer >= 1")
    if trace is not None and trace_reuse is not None:
        raise OffloadMoeError("give a trace file or a reuse probability to synthesize one, not both")
    if guess_accuracy is not None and not (isinstance(guess_accuracy, (int, float)) and 0 <= guess_accuracy <= 1):
        raise OffloadMoeError(f"guess accuracy = {guess_accuracy!r}, expected a probability from 0 to 1")

    ckpt = source if hasattr(source, "expert") else Checkpoint(source)
    cfg = ckpt.config
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, cfg.torch_dtype)
    context = prompt_tokens + tokens
    if context > cfg.max_position_embeddings:
        raise OffloadMoeError(f"prompt_tokens + tokens = {context} exceed the model's "
                              f"{cfg.max_position_embeddings} positions")
    slots, prefetch, limit = _resolve_settings(cfg, device, dtype, cache_slots, prefetch, profile, vram_limit, notes)
    before = torch.cuda.get_per_process_memory_fraction(device) if device.type == "cuda" else None
    vram = _apply_vram_limit(limit, device, notes)
    scratch = None
    if offload_dir is None:  # one folder for every row's disk tier (if any), removed at the end
        offload_dir = scratch = tempfile.mkdtemp(prefix="offload-moe-bench-")
    try:
        return _bench(ckpt, cfg, device, dtype, tokens=tokens, prompt_tokens=prompt_tokens, trace=trace,
                      trace_reuse=trace_reuse, guess_accuracy=guess_accuracy, slots=slots, prefetch=prefetch,
                      profile=profile, limit=limit, vram=vram, offload=offload, ram_budget=ram_budget,
                      offload_dir=offload_dir, cpu_experts=cpu_experts, seed=seed, baselines=baselines,
                      report=report, notes=notes)
    finally:
        if before is not None:
            torch.cuda.set_per_process_memory_fraction(before, device)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _bench(ckpt, cfg, device, dtype, *, tokens, prompt_tokens, trace, trace_reuse, guess_accuracy, slots, prefetch,
           profile, limit, vram, offload, ram_budget, offload_dir, cpu_experts, seed, baselines, report,
           notes) -> dict:
    synthetic = not Path(ckpt.path).is_dir()
    context = prompt_tokens + tokens
    moe_layers = list(getattr(cfg, "moe_layers", range(cfg.num_layers)))   # the engine numbers these 0, 1, ...

    # routing: the same for every row
    routing: dict = {"kind": "router", "file": None, "source": None, "trace_model": None, "trace_layers": None,
                     "trace_tokens": None, "reuse": None, "guess": "router", "guess_accuracy": None, "wrapped": False}
    if isinstance(trace, (str, Path)):
        routing["file"] = str(trace)
        trace = load_trace(trace)
    elif trace_reuse is not None:
        trace = synthesize(len(moe_layers), cfg.num_experts, cfg.top_k, context, trace_reuse, seed)
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
        if trace.num_layers != len(moe_layers):
            notes.append(f"The trace has {trace.num_layers} layers, the model {len(moe_layers)} MoE layers: MoE "
                         f"layer l replays trace layer l % {trace.num_layers}.")
        if len(trace) < context - 1:
            notes.append(f"The trace has {len(trace)} tokens, fewer than the {context - 1} the run routes: "
                         "it wraps around.")
            routing["wrapped"] = True
    elif synthetic:
        notes.append("No trace: the synthetic model's random routers decide, which gives nearly uniform "
                     "routing with little reuse (use --trace or --trace-reuse for realistic locality).")

    g = torch.Generator().manual_seed(seed)
    low = min(3, cfg.vocab_size - 1)
    prompt = torch.randint(low, cfg.vocab_size, (prompt_tokens,), generator=g).tolist()
    run = _Run(ckpt, synthetic, cfg, len(moe_layers), device, dtype, prompt, tokens, context, trace,
               guess_accuracy if trace is not None else None, seed, offload, ram_budget, offload_dir,
               profile, limit if device.type == "cuda" else None, cpu_experts, report)

    first = ckpt.expert(moe_layers[0], 0)
    bytes_per_expert = ExpertLayout(ExpertWeights(**{k: _to(v, "cpu", dtype) for k, v in first.items()})).nbytes
    del first
    report("memcpy", 0, 1)
    memcpy = measure_memcpy(bytes_per_expert, device)
    report("memcpy", 1, 1)

    # warm-up: one short throwaway generation, so that one-time costs (kernel loading and autotuning,
    # allocator growth, lazy imports) fall on no row
    t0 = time.perf_counter()
    _run_ours(replace(run, prompt=prompt[:4], tokens=2, report=lambda *a: None), "warmup", "warm-up",
              cache_slots=slots, prefetch=prefetch, policy="lru", guess=True, engine=True)
    warmup_seconds = time.perf_counter() - t0

    plan = ["engine"] + (["resident", "on_demand", "lru", "accelerate"] if baselines else [])
    rows: dict[str, dict] = {}
    dense_bytes, wrapped = None, False
    for i, name in enumerate(plan):
        report("bench", i, len(plan))
        label = LABELS[name].format(slots=_show(slots), prefetch=prefetch)
        if name == "engine":
            row = _run_ours(run, name, label, cache_slots=slots, prefetch=prefetch, policy="lru", guess=True,
                            engine=True)
            dense_bytes = row.pop("_dense_bytes", None)
        elif name == "resident":
            fits, why = _fits_all_experts(run, dense_bytes, bytes_per_expert)
            row = (_run_ours(run, name, label, cache_slots="all", prefetch=0, policy="lru", guess=False) if fits
                   else _skipped(name, label, why, {"experts": "resident"}))
        elif name == "on_demand":
            row = _run_ours(run, name, label, cache_slots=cfg.top_k, prefetch=0, policy="none", guess=False)
        elif name == "lru":
            row = _run_ours(run, name, label, cache_slots=slots, prefetch=0, policy="lru", guess=False)
        else:
            budget = limit if (limit and device.type == "cuda") else rows["engine"].get("peak_vram_bytes")
            row = _run_accelerate(run, name, label, budget)
        row.pop("_dense_bytes", None)
        wrapped = row.pop("_wrapped", False) or wrapped
        rows[name] = row
        report("bench", i + 1, len(plan))

    compute = _compute_reference(run, rows, dense_bytes, bytes_per_expert)
    bandwidth = memcpy["peak_gbps"] * 1e9
    reference_ids = rows["engine"].get("token_ids")
    for row in rows.values():
        if row["status"] != "ok":
            continue
        row["tokens_match_engine"] = row["token_ids"] == reference_ids if reference_ids is not None else None
        if row["name"] == "accelerate":
            moved = row["decode_bytes_moved"]
        else:
            moved = (row["decode_misses"] or 0) * bytes_per_expert
        row["bound_transfer_seconds"] = moved / bandwidth if bandwidth > 0 else None
        if compute["decode_seconds"] is not None and row["bound_transfer_seconds"] is not None:
            row["bound_compute_seconds"] = compute["decode_seconds"]
            row["bound_seconds"] = row["bound_transfer_seconds"] + compute["decode_seconds"]
            row["ratio"] = row["decode_seconds"] / row["bound_seconds"] if row["bound_seconds"] > 0 else None

    belady = _belady_summary(rows, slots)
    ok = [r for r in rows.values() if r["status"] == "ok" and r["name"] != "accelerate"]
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"offload_moe": __version__, "torch": torch.__version__},
        "model": {"source": str(ckpt.path), "synthetic": synthetic, "model_type": getattr(cfg, "model_type", None),
                  "num_layers": cfg.num_layers,
                  "num_experts": cfg.num_experts, "top_k": cfg.top_k, "hidden_size": cfg.hidden_size,
                  "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
                  "dtype": str(dtype).removeprefix("torch."), "bytes_per_expert": bytes_per_expert,
                  "moe_layers": len(moe_layers),
                  "expert_bytes_total": bytes_per_expert * len(moe_layers) * cfg.num_experts},
        "device": _device_info(device),
        "vram_limit": vram,
        "settings": {"tokens": tokens, "prompt_tokens": prompt_tokens, "cache_slots": slots, "prefetch": prefetch,
                     "profile": getattr(profile, "name", profile), "offload": offload, "seed": seed,
                     "baselines": baselines},
        "routing": routing | {"wrapped": routing["wrapped"] or wrapped},
        "memcpy": memcpy,
        "warmup_seconds": warmup_seconds,
        "compute_reference": compute,
        "belady": belady,
        "same_tokens": all(r["token_ids"] == reference_ids for r in ok) if ok else None,
        "rows": [rows[name] for name in plan],
        "notes": notes,
    }


# ---- settings ----

def _show(slots) -> str:
    return "/".join(map(str, slots)) if isinstance(slots, list) else str(slots)


def _resolve_settings(cfg, device, dtype, cache_slots, prefetch, profile, vram_limit, notes):
    """The engine row's slots and prefetch depth, and the VRAM limit: given values first, then the
    profile's placement (the same planner `load(profile=...)` uses), then the defaults."""
    E, k = cfg.num_experts, cfg.top_k
    placement = {}
    if profile:
        placement, name = apply_profile(profile, cfg, device, dtype)
        if cache_slots is None and placement.get("cache_slots") is not None:
            cache_slots = placement["cache_slots"]
            notes.append(f"Slots per layer from profile {name}: {cache_slots}.")
    if cache_slots is None:
        cache_slots = max(k, E // 2)
        notes.append(f"Slots per layer: {cache_slots} (default max(top_k, num_experts // 2)).")
    if cache_slots == "all":
        cache_slots = E   # the engine with a slot for every expert (not the resident row)
    if isinstance(cache_slots, list):
        if len(cache_slots) != cfg.num_layers or any(isinstance(s, bool) or not isinstance(s, int)
                                                      or not 1 <= s <= E for s in cache_slots):
            raise OffloadMoeError(f"cache_slots = {cache_slots!r}, expected {cfg.num_layers} integers in 1..{E}")
    elif isinstance(cache_slots, bool) or not isinstance(cache_slots, int) or not 1 <= cache_slots <= E:
        raise OffloadMoeError(f"cache_slots = {cache_slots!r}, expected 'all' or an integer in 1..{E}")
    if prefetch is None:
        prefetch = placement.get("prefetch", 1)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise OffloadMoeError(f"prefetch = {prefetch!r}, expected a depth >= 0 (layers ahead)")
    try:
        limit = parse_bytes(vram_limit) if vram_limit is not None else None
    except OffloadMoeError:
        raise OffloadMoeError(f"vram limit = {vram_limit!r}, expected a size such as 12GB or 11.5GiB") from None
    if limit is None and profile and profile != "auto" and device.type == "cuda":
        prof = profile if isinstance(profile, Profile) else load_profile(profile)
        if prof.device == "cuda":
            limit = prof.vram_budget
            notes.append(f"VRAM limit from profile {prof.name}: {limit / 1e9:.2f} GB.")
    if limit is not None and limit <= 0:
        raise OffloadMoeError(f"vram limit = {vram_limit!r}, expected a positive size such as 12GB")
    return cache_slots, prefetch, limit


def _apply_vram_limit(limit, device, notes) -> dict:
    out = {"requested_bytes": limit, "applied": False, "fraction": None, "total_bytes": None, "note": None}
    if limit is None:
        return out
    if device.type != "cuda":
        out["note"] = f"not applicable on {device.type}: no GPU memory to limit"
        notes.append(f"VRAM limit {limit / 1e9:.2f} GB: not applicable on {device.type}.")
        return out
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = limit / total
    if fraction > 1:
        out.update(total_bytes=total, note=f"the limit exceeds the GPU's {total / 1e9:.2f} GB: not applied")
        notes.append(out["note"])
        return out
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    out.update(applied=True, fraction=fraction, total_bytes=total,
               note="torch.cuda.set_per_process_memory_fraction(limit / total)")
    return out


def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "total_memory_bytes": p.total_memory,
                "cpu_threads": torch.get_num_threads()}
    return {"type": device.type, "name": _cpu_name(), "total_memory_bytes": None,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


# ---- measurements ----

def measure_memcpy(nbytes: int, device: torch.device, *, repeats: int = 10, trials: int = 5) -> dict:
    """Peak copy rate of one expert-sized buffer: pinned host→device on CUDA (timed with CUDA events
    on a side stream), RAM→RAM on the CPU (wall clock). `repeats` copies per trial; the best trial
    is the peak (decimal GB/s)."""
    rates = []
    if device.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            for _ in range(3):
                dst.copy_(src, non_blocking=True)
            stream.synchronize()
            for _ in range(trials):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                for _ in range(repeats):
                    dst.copy_(src, non_blocking=True)
                end.record(stream)
                end.synchronize()
                rates.append(repeats * nbytes / (start.elapsed_time(end) / 1000) / 1e9)
        kind = "pinned host->device"
        del src, dst
    else:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(repeats):
                dst.copy_(src)
            rates.append(repeats * nbytes / (time.perf_counter() - t0) / 1e9)
        kind = "host RAM->RAM memcpy"
    return {"kind": kind, "bytes": nbytes, "repeats": repeats, "trials": trials,
            "peak_gbps": max(rates), "median_gbps": statistics.median(rates), "trial_gbps": rates}


class _CopyTimer:
    """Times every copy the engine makes (see `copy_seconds` in the module docstring) by wrapping the
    cache instance's `_copy_in`."""

    def __init__(self, cache):
        self.cache, self.seconds, self.events = cache, 0.0, []
        original = getattr(cache, "_copy_in", None)
        if original is None:      # not an ExpertCache: nothing to time
            self.seconds = None
            return

        def timed(layer: int, expert: int, slot: int) -> None:
            if cache.cuda:
                stream = cache.copy_stream
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                stream.wait_event(cache.released[layer][slot])   # time the copy, not the wait for its slot
                start.record(stream)
                original(layer, expert, slot)
                end.record(stream)
                self.events.append((start, end))
            else:
                t0 = time.perf_counter()
                original(layer, expert, slot)
                self.seconds += time.perf_counter() - t0

        cache._copy_in = timed

    def total(self) -> float | None:
        if self.events:
            torch.cuda.synchronize(self.cache.device)
            self.seconds += sum(s.elapsed_time(e) for s, e in self.events) / 1000
            self.events.clear()
        return self.seconds


def _reset_peaks(device: torch.device) -> bool:
    """Reset peak VRAM and peak RSS counters; True if the RSS peak could be reset (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if os.uname().sysname == "Darwin" else rss * 1024   # Linux reports KiB


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _row(name: str, label: str, settings: dict) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(name=name, label=label, status="ok", settings=settings)
    return row


def _skipped(name: str, label: str, reason: str, settings: dict) -> dict:
    row = _row(name, label, settings)
    row.update(status="skipped", reason=reason)
    return row


def _run_ours(run: _Run, name: str, label: str, *, cache_slots, prefetch: int, policy: str, guess: bool,
              engine: bool = False) -> dict:
    """One generation with offload_moe's model: all resident (cache_slots "all") or offloaded."""
    offloaded = cache_slots != "all"
    settings = {"experts": "offloaded" if offloaded else "resident", "cache_slots": cache_slots,
                "prefetch": prefetch if offloaded else None, "policy": policy if offloaded else None,
                "guess": None}
    if offloaded and prefetch:
        settings["guess"] = (f"emulated (accuracy {run.guess_accuracy})" if guess and run.guess_accuracy is not None
                             else "router")
    try:
        row = _measure_ours(run, _row(name, label, settings), cache_slots=cache_slots, prefetch=prefetch,
                            policy=policy, guess=guess, engine=engine)
    except torch.cuda.OutOfMemoryError as e:
        row = _skipped(name, label, f"out of memory on {run.device}: {str(e).splitlines()[0]}", settings)
    _free(run.device)   # after the frame holding the model is gone (the copy timer makes a cycle: gc)
    return row


def _measure_ours(run: _Run, row: dict, *, cache_slots, prefetch: int, policy: str, guess: bool,
                  engine: bool) -> dict:
    offloaded, settings = cache_slots != "all", row["settings"]
    extra = {}
    if "cpu_experts" in inspect.signature(load).parameters:
        # baselines copy every miss; the engine row is load's default unless told
        cpu = (run.cpu_experts if engine else "none") if offloaded else None
        if cpu is not None:
            extra["cpu_experts"] = cpu
    rss_reset = _reset_peaks(run.device)
    t0 = time.perf_counter()
    model = load(run.ckpt, device=run.device, dtype=run.dtype, profile=run.profile, context_length=run.context,
                 cache_slots=cache_slots, prefetch=prefetch, policy=policy,
                 offload=run.offload, ram_budget=run.ram_budget, offload_dir=run.offload_dir,
                 record_trace=offloaded, progress=run.report, **extra)
    row["load_seconds"] = time.perf_counter() - t0
    if "cpu_experts" in model.settings:
        settings["cpu_experts"] = model.settings["cpu_experts"]
    router = None
    if run.trace is not None:
        router = TraceRouter(run.trace, run.moe_layers, seed=run.seed,
                             guess_accuracy=run.guess_accuracy if guess else None)
        router.install(model)
    timer = _CopyTimer(model.experts) if offloaded else None
    timing = DecodeTiming()
    model.last_timing = timing
    token_ids, at_first, stamps = [], None, []
    for i, token in enumerate(decode_tokens(model.transformer, run.prompt, run.tokens, Sampling(temperature=0.0),
                                            timing)):
        stamps.append(time.perf_counter())
        token_ids.append(token)
        if i == 0 and offloaded:
            at_first = (model.experts.stats(), timer.total())
        run.report("tokens", i + 1, run.tokens)
    gen = model.stats["generation"]
    row.update(prompt_tokens=gen["prompt_tokens"], new_tokens=gen["new_tokens"],
               prefill_seconds=gen["prefill_seconds"], ttft_seconds=gen["prefill_seconds"],
               prefill_tokens_per_second=gen["prefill_tokens_per_second"],
               decode_seconds=gen["decode_seconds"], decode_tokens_per_second=gen["decode_tokens_per_second"],
               **_steps(stamps), token_ids=token_ids)
    row["peak_vram_bytes"] = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else None
    row["peak_rss_bytes"] = _peak_rss()
    settings["peak_rss_scope"] = "this row" if rss_reset else "process lifetime"
    row["_dense_bytes"] = sum(t.numel() * t.element_size()
                              for t in list(model.transformer.parameters()) + list(model.transformer.buffers()))
    row["_wrapped"] = bool(router and router.wrapped)
    if offloaded:
        st = model.experts.stats()
        copy_seconds = timer.total()
        before, copy_before = at_first if at_first else (st, copy_seconds)
        settings["cache_slots"] = st["slots_per_layer"]
        decode_hits, decode_misses = st["hits"] - before["hits"], st["misses"] - before["misses"]
        row.update(hits=st["hits"], misses=st["misses"], hit_rate=st["hit_rate"],
                   decode_hits=decode_hits, decode_misses=decode_misses,
                   decode_hit_rate=(decode_hits / (decode_hits + decode_misses)
                                    if decode_hits + decode_misses else 0.0),
                   prefetch_issued=st["prefetch_issued"], prefetch_used=st["prefetch_used"],
                   prefetch_accuracy=st["prefetch_accuracy"], cpu_computed=st.get("cpu_computed", 0),
                   bytes_per_expert=st["bytes_per_expert"],
                   bytes_moved=st["bytes_moved"], decode_bytes_moved=st["bytes_moved"] - before["bytes_moved"],
                   stall_seconds=st["stall_seconds"], copy_seconds=copy_seconds,
                   decode_stall_seconds=st["stall_seconds"] - before["stall_seconds"],
                   decode_copy_seconds=copy_seconds - copy_before if copy_seconds is not None else None,
                   achieved_gbps=st["bytes_moved"] / copy_seconds / 1e9 if copy_seconds else None)
        if getattr(model.experts, "trace", None) is not None:
            row.update(_belady(model.experts.trace, st["slots_per_layer"]))
    else:
        row.update(hits=0, misses=0, decode_hits=0, decode_misses=0, cpu_computed=0, bytes_moved=0, decode_bytes_moved=0,
                   stall_seconds=0.0, decode_stall_seconds=0.0, copy_seconds=0.0, decode_copy_seconds=0.0)
    return row


def _belady(trace, slots: list[int]) -> dict:
    """Belady and LRU hit rates of a recorded engine trace (per layer, summed), for the given slots."""
    b_hits = l_hits = uses = 0
    for layer, steps in enumerate(trace):
        h, m = simulate(steps, slots[layer], Belady(steps))
        b_hits, uses = b_hits + h, uses + h + m
        l_hits += simulate(steps, slots[layer], LRU())[0]
    belady = b_hits / uses if uses else 0.0
    lru = l_hits / uses if uses else 0.0
    return {"belady_hit_rate": belady, "lru_hit_rate_simulated": lru,
            "lru_fraction_of_belady": lru / belady if belady > 0 else None}


def _belady_summary(rows: dict, slots) -> dict:
    """The configured slots: Belady's hit rate, LRU's measured one (the lru row, else simulated), and the
    fraction."""
    out = {"slots": slots, "belady_hit_rate": None, "lru_hit_rate": None, "lru_fraction_of_belady": None,
           "from_row": None}
    for name in ("lru", "engine"):
        row = rows.get(name)
        if row and row["status"] == "ok" and row["belady_hit_rate"] is not None:
            lru = row["hit_rate"] if name == "lru" else row["lru_hit_rate_simulated"]
            out.update(belady_hit_rate=row["belady_hit_rate"], lru_hit_rate=lru, from_row=name,
                       lru_fraction_of_belady=lru / row["belady_hit_rate"] if row["belady_hit_rate"] > 0 else None)
            break
    return out


def _fits_all_experts(run: _Run, dense_bytes: int | None, bytes_per_expert: int) -> tuple[bool, str | None]:
    """Whether every expert plus the dense weights and KV cache fit the compute device (under the VRAM
    limit on CUDA; in available RAM on the CPU), with a margin for activations."""
    cfg = run.cfg
    experts = bytes_per_expert * run.moe_layers * cfg.num_experts
    need = (dense_bytes or 0) + experts
    if run.device.type == "cuda":
        need += max(256 * 2**20, need // 20)
        total = torch.cuda.get_device_properties(run.device).total_memory
        free, _ = torch.cuda.mem_get_info(run.device)
        budget = min(run.vram_limit or total, free + torch.cuda.memory_reserved(run.device))
        where = "the VRAM limit" if run.vram_limit else "free on the GPU"
    else:
        budget = available_ram()
        where = "available RAM"
        if budget == 0:
            return True, None   # unknown: try
    if need > budget:
        return False, (f"all {run.moe_layers * cfg.num_experts} experts ({experts / 1e9:.2f} GB) with the dense "
                       f"weights and KV cache need ~{need / 1e9:.2f} GB, more than the {budget / 1e9:.2f} GB "
                       f"{where}")
    return True, None


def _compute_reference(run: _Run, rows: dict, dense_bytes, bytes_per_expert) -> dict:
    """Decode time with no transfers: (tokens - 1) x the fastest decode step of the resident row, else of
    a slots="all" engine run (when it fits), else unknown. Decode steps cost the same whatever the
    position (the KV cache is preallocated), so the fastest step is the compute time without the
    preemptions and stray stalls a shared machine adds."""
    steps = run.tokens - 1
    resident = rows.get("resident")
    if resident and resident["status"] == "ok":
        return {"source": "resident row", "decode_seconds": (resident["decode_step_min_seconds"] or 0.0) * steps,
                "step_seconds": resident["decode_step_min_seconds"], "note": None}
    fits, why = _fits_all_experts(run, dense_bytes, bytes_per_expert)
    if fits:
        row = _run_ours(run, "compute_reference", "slots=all", cache_slots=run.cfg.num_experts, prefetch=0,
                        policy="lru", guess=False)
        if row["status"] == "ok":
            return {"source": "slots=all engine run",
                    "decode_seconds": (row["decode_step_min_seconds"] or 0.0) * steps,
                    "step_seconds": row["decode_step_min_seconds"],
                    "note": "the resident row did not run; with a slot for every expert the fastest decode "
                            "step copies nothing"}
        why = row["reason"]
    return {"source": None, "decode_seconds": None, "step_seconds": None,
            "note": f"compute time unknown, so no lower bound: {why}"}


def _steps(stamps: list[float]) -> dict:
    """Fastest and median time between consecutive generated tokens (decode steps)."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"decode_step_min_seconds": min(steps) if steps else None,
            "decode_step_median_seconds": statistics.median(steps) if steps else None}


# ---- Hugging Face accelerate ----

def _run_accelerate(run: _Run, name: str, label: str, gpu_budget: int | None) -> dict:
    settings = {"experts": "accelerate device_map offload", "gpu_max_memory": gpu_budget}
    if run.synthetic:
        return _skipped(name, label, "needs a checkpoint directory (synthetic weights exist only inside offload_moe)",
                        settings)
    if getattr(run.cfg, "model_type", "mixtral") != "mixtral":
        return _skipped(name, label, f"transformers' MixtralForCausalLM runs Mixtral checkpoints; this is "
                        f"{run.cfg.model_type!r}", settings)
    if run.device.type != "cuda":
        return _skipped(name, label, f"needs CUDA (device is {run.device.type}): accelerate's device_map offload "
                        "streams weights to a GPU", settings)
    if importlib.util.find_spec("accelerate") is None:
        return _skipped(name, label, "accelerate is not installed (pip install 'offload-moe[bench]')", settings)
    if run.cfg.quantization:
        return _skipped(name, label, "quantized checkpoint: transformers cannot read offload_moe's packed format",
                        settings)
    row = _row(name, label, settings)
    rss_reset = _reset_peaks(run.device)
    index = run.device.index if run.device.index is not None else torch.cuda.current_device()
    max_memory = {"cpu": int(0.9 * available_ram())} if available_ram() else {}
    if gpu_budget:
        max_memory[index] = int(gpu_budget)
    settings["max_memory"] = {str(k): v for k, v in max_memory.items()}
    try:
        measured = hf_offload_generate(run.ckpt.path, dtype=run.dtype, max_memory=max_memory or None,
                                       prompt=run.prompt, tokens=run.tokens, trace=run.trace, seed=run.seed,
                                       input_device=torch.device("cuda", index), report=run.report)
    except torch.cuda.OutOfMemoryError as e:
        return _skipped(name, label, f"out of memory on {run.device}: {str(e).splitlines()[0]}", settings)
    finally:
        _free(run.device)
    settings.update(device_map=measured.pop("device_map"),
                    offloaded_bytes_per_forward=measured.pop("offloaded_bytes_per_forward"),
                    peak_rss_scope="this row" if rss_reset else "process lifetime",
                    bytes_moved_note="counted, not timed: accelerate copies every offloaded weight to the GPU on "
                                     "each forward pass, so bytes moved = forward passes x offloaded bytes")
    row["_wrapped"] = measured.pop("wrapped")
    row.update(measured, peak_vram_bytes=torch.cuda.max_memory_allocated(run.device), peak_rss_bytes=_peak_rss())
    return row


def hf_offload_generate(path, *, dtype, max_memory, prompt: list[int], tokens: int, trace: Trace | None,
                        seed: int, input_device: torch.device, report: Progress) -> dict:
    """Greedy generation with transformers' MixtralForCausalLM dispatched by accelerate
    (`device_map="auto"` under `max_memory`, the rest offloaded to CPU RAM or a temporary disk folder),
    routes forced to `trace` when given. Returns the row's timing and transfer fields plus
    `device_map`, `offloaded_bytes_per_forward` and `wrapped`."""
    from transformers import MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    folder = tempfile.mkdtemp(prefix="offload-moe-bench-accelerate-")
    model = None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # its bars would fight the caller's progress display on stderr
    try:
        t0 = time.perf_counter()
        model = MixtralForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                   offload_folder=folder).eval()
        load_seconds = time.perf_counter() - t0
        placement = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
        offloaded = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                        if _placed(n, placement) in ("cpu", "disk"))
        router = None
        if trace is not None:
            router = TraceRouter(trace, model.config.num_hidden_layers, seed=seed)
            for i, layer in enumerate(model.model.layers):
                layer.mlp.gate.register_forward_hook(_forced_hook(router, i))
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([prompt], device=input_device), use_cache=True, logits_to_keep=1)
            token = out.logits[0, -1].argmax()
            token_ids = [int(token)]
            stamps = [time.perf_counter()]
            prefill = stamps[0] - t0
            report("tokens", 1, tokens)
            past = out.past_key_values
            t1 = time.perf_counter()
            for i in range(1, tokens):
                out = model(input_ids=token.view(1, 1).to(input_device), past_key_values=past, use_cache=True,
                            logits_to_keep=1)
                past = out.past_key_values
                token = out.logits[0, -1].argmax()
                token_ids.append(int(token))
                stamps.append(time.perf_counter())
                report("tokens", i + 1, tokens)
            decode = time.perf_counter() - t1
        steps = tokens - 1
        return dict(load_seconds=load_seconds, prompt_tokens=len(prompt), new_tokens=tokens, prefill_seconds=prefill,
                    ttft_seconds=prefill, prefill_tokens_per_second=len(prompt) / prefill if prefill > 0 else 0.0,
                    decode_seconds=decode, decode_tokens_per_second=steps / decode if decode > 0 else 0.0,
                    **_steps(stamps),
                    bytes_moved=offloaded * tokens, decode_bytes_moved=offloaded * steps, token_ids=token_ids,
                    device_map=placement, offloaded_bytes_per_forward=offloaded,
                    wrapped=bool(router and router.wrapped))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        del model
        gc.collect()
        shutil.rmtree(folder, ignore_errors=True)


def _placed(param: str, placement: dict[str, str]) -> str | None:
    """Where accelerate put a parameter: the device of the longest module prefix in hf_device_map."""
    best, where = -1, None
    for module, device in placement.items():
        if (module == "" or param == module or param.startswith(module + ".")) and len(module) > best:
            best, where = len(module), device
    return where


def _forced_hook(router: TraceRouter, layer: int):
    """A forward hook on transformers' MixtralTopKRouter: replace its top-k with the trace's routes
    (weights: the router's probabilities of those experts, renormalised, as in MoEBlock.route)."""

    def hook(module, args, output):
        logits, scores, ids = output
        forced = router(layer, ids.shape[0]).to(ids.device)
        probs = torch.softmax(logits.float(), dim=-1)
        weights = probs.gather(-1, forced)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(scores.dtype), forced.to(ids.dtype)

    return hook


__all__ = ["run_bench", "measure_memcpy", "ROW_FIELDS", "FORMAT"]
