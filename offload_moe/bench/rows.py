"""One row of the benchmark with offload_moe's own model: load it under a row's settings, generate the
run's tokens, and fill the row's fields; and the compute reference the lower bound needs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..generation.generate import DecodeTiming, Sampling, decode_tokens
from ..api.loader import load
from ..placement.profiles import Profile
from ..placement.options import Placement
from ..base.runtime import Progress, available_ram
from ..tools.trace import Trace, TraceRouter
from .bounds import belady_rates, hit_rate_curve
from .measure import CopyTimer, decode_steps, free_memory, peak_rss, reset_peaks

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
class Run:
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
    profile: str | Profile | None
    vram_limit: int | None
    cpu_experts: object        # the engine row's load(cpu_experts=...); None: load's default
    report: Progress


def new_row(name: str, label: str, settings: dict) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(name=name, label=label, status="ok", settings=settings)
    return row


def skipped_row(name: str, label: str, reason: str, settings: dict) -> dict:
    row = new_row(name, label, settings)
    row.update(status="skipped", reason=reason)
    return row


def run_ours(run: Run, name: str, label: str, *, cache_slots, prefetch: int, policy: str, guess: bool,
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
        row = _measure_ours(run, new_row(name, label, settings), cache_slots=cache_slots, prefetch=prefetch,
                            policy=policy, guess=guess, engine=engine)
    except torch.cuda.OutOfMemoryError as e:
        row = skipped_row(name, label, f"out of memory on {run.device}: {str(e).splitlines()[0]}", settings)
    free_memory(run.device)   # after the frame holding the model is gone (the copy timer makes a cycle: gc)
    return row


def _measure_ours(run: Run, row: dict, *, cache_slots, prefetch: int, policy: str, guess: bool,
                  engine: bool) -> dict:
    offloaded, settings = cache_slots != "all", row["settings"]
    # baselines copy every miss; the engine row is load's default unless told (None)
    cpu = (run.cpu_experts if engine else "none") if offloaded else None
    placement = Placement(context_length=run.context, cache_slots=cache_slots, prefetch=prefetch, policy=policy,
                          offload=run.offload, ram_budget=run.ram_budget, offload_dir=run.offload_dir,
                          record_trace=offloaded, cpu_experts=cpu)
    rss_reset = reset_peaks(run.device)
    t0 = time.perf_counter()
    model = load(run.ckpt, placement, device=run.device, dtype=run.dtype, profile=run.profile, progress=run.report,
                 threads=None)  # bench's threads, as set
    row["load_seconds"] = time.perf_counter() - t0
    settings["cpu_experts"] = model.settings.cpu_experts
    router = None
    if run.trace is not None:
        router = TraceRouter(run.trace, run.moe_layers, seed=run.seed,
                             guess_accuracy=run.guess_accuracy if guess else None)
        router.install(model)
    timer = CopyTimer(model.experts) if offloaded else None
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
               **decode_steps(stamps), token_ids=token_ids)
    row["peak_vram_bytes"] = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else None
    row["peak_rss_bytes"] = peak_rss()
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
            row.update(belady_rates(model.experts.trace, st["slots_per_layer"]))
            if engine:
                row["_curve"] = hit_rate_curve(model.experts.trace, run.cfg.top_k, run.cfg.num_experts)
    else:
        row.update(hits=0, misses=0, decode_hits=0, decode_misses=0, cpu_computed=0, bytes_moved=0, decode_bytes_moved=0,
                   stall_seconds=0.0, decode_stall_seconds=0.0, copy_seconds=0.0, decode_copy_seconds=0.0)
    return row


def fits_all_experts(run: Run, dense_bytes: int | None, bytes_per_expert: int) -> tuple[bool, str | None]:
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


def compute_reference(run: Run, rows: dict, dense_bytes, bytes_per_expert, fastest_step: float | None) -> dict:
    """Decode time with no transfers: (tokens - 1) x the fastest decode step of any run of any row.
    Decode steps cost the same whatever the position (the KV cache is preallocated), and no run's step
    was faster, so this is a lower bound of every row's compute; taking the fastest leaves out the
    preemptions and stray stalls a shared machine adds."""
    steps = run.tokens - 1
    if fastest_step is None:
        return {"source": None, "decode_seconds": None, "step_seconds": None,
                "note": "compute time unknown (no run decoded more than one token), so no lower bound"}
    return {"source": "fastest decode step of any run", "decode_seconds": fastest_step * steps,
            "step_seconds": fastest_step, "note": None}
