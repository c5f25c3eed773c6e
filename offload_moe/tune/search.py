"""`tune`: load the model under a few engine settings, decode the same tokens greedily from the same
prompt under each, and keep the fastest (the search is described in the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import statistics
import time
from datetime import datetime
from pathlib import Path

import torch

from ..base.runtime import DTYPES, Progress, demo_dir, fmt_bytes, resolve_device
from ..api.sources import open_checkpoint, open_tokenizer
from ..base.errors import OffloadMoeError
from ..experts.layout import ExpertLayout
from ..model.expert_interface import ExpertWeights
from ..placement.options import Placement
from ..placement.planner import checkpoint_float_bits, plan
from ..placement.profiles import Profile
from .disk import DISK_TEST_BYTES
from .machine import EXPERT_BITS, ExpertSpec, cost_model, measure_machine, pick_group_size
from .settings import TIERS, Row, Setting, TuneResult, pick_best
from .trial import Trial, run_stages

PROMPT_TEXT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in "
               "Mainz combined movable metal type, oil-based ink and a screw press")


def _checkpoint_bits(ckpt) -> dict:
    if ckpt.quant is not None:
        return {k: ckpt.quant.settings[k] for k in ("experts", "attention", "embeddings")}
    b = checkpoint_float_bits(ckpt.config)
    return {"experts": b, "attention": b, "embeddings": b}


def _cuda_fit(cfg, bits: dict, vram: int) -> int:
    """Slots per layer the planner fits in `vram` bytes (reserve 1 GB, a 4096-token KV cache)."""
    prof = Profile(name="tune", source="tune", device="cuda", vram_budget=vram, reserve=10**9,
                   context_length=4096, experts_bits=bits["experts"], attention_bits=bits["attention"],
                   embeddings_bits=bits["embeddings"], cache_slots=None, prefetch=1, offload="ram",
                   ram_budget=None)
    try:
        return plan(cfg, prof).slots_per_layer
    except OffloadMoeError:
        return 0


def _default_stages(cfg, fit: int, on_cuda: bool) -> list[list[Setting] | str]:
    """Stage 1: slots; 'prefetch' and 'tier' stages are filled in from the best row so far."""
    k = cfg.top_k
    slots = sorted({min(k, fit), min(2 * k, fit), fit} - {0})
    first = 1 if on_cuda else 0
    return [[Setting(s, first, "ram") for s in slots], "prefetch", "tier"]


def prompt_ids(ckpt) -> list[int]:
    """The fixed prompt: PROMPT_TEXT through the checkpoint's tokenizer, or without a tokenizer.json
    a fixed spread of 16 ids after BOS."""
    tokenizer = open_tokenizer(ckpt)
    if tokenizer is not None:
        return tokenizer.encode(PROMPT_TEXT)
    cfg = ckpt.config
    start = [cfg.bos_token_id] if cfg.bos_token_id is not None else []
    return start + [(17 * i + 5) % cfg.vocab_size for i in range(16)]


def confirm_against_default(rows: list[Row], best: Row, default: Setting | None, run_one, *, rounds: int,
                            deadline: float, notes: list[str]) -> Row:
    """On a busy machine one run per setting can crown a setting by luck. Re-measure the best and the
    default (all experts that fit, in slots) alternately, `rounds` more times each, and compare medians:
    the profile never keeps a setting that measured slower than the default."""
    base = next((r for r in rows if r.setting == default and r.error is None and r.tokens > 0), None)
    if base is None or best is base:
        return best
    for _ in range(rounds):
        if time.perf_counter() > deadline:
            notes.append("re-measuring the best setting against the default was cut short by the time budget")
            break
        for row in (best, base):
            again = run_one(row.setting)
            if again.error is None and again.tokens > 0:
                row.runs.append(again.decode_tokens_per_second)
    for row in (best, base):
        row.decode_tokens_per_second = statistics.median(row.runs)
    if base.decode_tokens_per_second >= best.decode_tokens_per_second:
        notes.append(f"{best.setting} was not faster than the default ({default}) when re-measured "
                     f"({len(best.runs)} runs each, medians {best.decode_tokens_per_second:.1f} vs "
                     f"{base.decode_tokens_per_second:.1f} tok/s): the profile keeps the default")
        return base
    return best


@dataclass(frozen=True)
class TuneOptions:
    """What a tune run tries.

    tokens: decoded per setting (default 32 on the CPU, 64 on CUDA). settings: (slots, prefetch, tier)
    tuples or `Setting`s, run in order (default: the coordinate search in the package docstring).
    setting_seconds: the deadline of one setting's decode (default 8 s on the CPU, 20 s on CUDA).
    time_budget: seconds for the whole run, measurements included (default 100 on the CPU, 300 on
    CUDA); settings left when it is spent are skipped (the first always runs). offload_dir: where the
    disk tier and the disk test write (default: the temp dir); everything written there is removed
    afterwards. measure=False skips `measure_machine` (the profile header then says so)."""
    tokens: int | None = None
    settings: tuple | list | None = None
    offload_dir: str | Path | None = None
    disk_bytes: int = DISK_TEST_BYTES
    setting_seconds: float | None = None
    time_budget: float | None = None
    measure: bool = True

    def resolved(self, on_cuda: bool) -> TuneOptions:
        """Checked, the device's defaults filled in (32 tokens, 8 s a setting, 100 s in all on the CPU;
        64, 20 s and 300 s on CUDA)."""
        tokens = self.tokens if self.tokens is not None else (64 if on_cuda else 32)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
            raise OffloadMoeError(f"tokens = {tokens!r}, expected an integer >= 2 (one prefill token, then decode)")
        if self.setting_seconds is not None and not self.setting_seconds > 0:
            raise OffloadMoeError(f"seconds per setting = {self.setting_seconds!r}, expected a positive number")
        if self.time_budget is not None and not self.time_budget > 0:
            raise OffloadMoeError(f"time budget = {self.time_budget!r}, expected a positive number of seconds")
        if self.measure and self.disk_bytes < 2**20:
            raise OffloadMoeError(f"disk test size {self.disk_bytes:,} bytes: expected at least 1MiB")
        return replace(self, tokens=tokens, setting_seconds=self.setting_seconds or (20.0 if on_cuda else 8.0),
                       time_budget=self.time_budget or (300.0 if on_cuda else 100.0))


def tune(model_path: str | Path | None = None, options: TuneOptions | None = None,
         placement: Placement | None = None, *, device: str = "auto",
         progress: Progress | None = None) -> TuneResult:
    """Measure the machine, then decode a few tokens under each setting `options` names and pick the
    best (see `TuneOptions`).

    placement: what every setting loads with besides its slots, prefetch and tier (each setting is
    `Setting.placement(placement)`, its context always the prompt plus `tokens`; default: nothing else)."""
    started = time.perf_counter()
    report = progress or (lambda what, done, total: None)
    if model_path is None:
        model_path = demo_dir()
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    opts = (options or TuneOptions()).resolved(on_cuda)
    tokens, settings, offload_dir, disk_bytes = opts.tokens, opts.settings, opts.offload_dir, opts.disk_bytes
    setting_seconds, time_budget, measure = opts.setting_seconds, opts.time_budget, opts.measure
    ckpt = open_checkpoint(model_path)
    cfg = ckpt.config
    bits = _checkpoint_bits(ckpt)
    # free VRAM now, in whole 10 MB: the profile's budget, so the slots chosen below fit it exactly
    vram = torch.cuda.mem_get_info(dev)[0] // 10**7 * 10**7 if on_cuda else 0
    fit = cfg.num_experts
    notes = []
    if on_cuda:
        fit = _cuda_fit(cfg, bits, vram)
        if fit < 1:
            raise OffloadMoeError(f"tune: {fmt_bytes(vram)} of free VRAM does not hold the shared weights, "
                                  "a 4096-token KV cache, 1 GB reserve and one expert slot per layer")

    first_moe = cfg.moe_layers[0]  # checkpoint layer numbering counts dense layers
    layout = ExpertLayout(ExpertWeights(**ckpt.expert(first_moe, 0)))
    base = Path(offload_dir) if offload_dir is not None else None
    if base is not None:
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OffloadMoeError(f"offload_dir {str(base)!r} cannot be created ({e.strerror})") from None

    # ---- the workload ----
    if settings is not None:
        stages: list = [[s if isinstance(s, Setting) else Setting(*s) for s in settings]]
        if not stages[0]:
            raise OffloadMoeError("settings: expected at least one (slots, prefetch, tier)")
    else:
        stages = _default_stages(cfg, fit, on_cuda)
    for s in (stages[0] if settings is not None else []):
        if not 1 <= s.slots <= cfg.num_experts or s.prefetch < 0 or s.tier not in TIERS:
            raise OffloadMoeError(f"setting {s}: expected 1..{cfg.num_experts} slots, prefetch >= 0, "
                                  "tier ram or disk")
    max_pos = cfg.max_position_embeddings
    prompt = prompt_ids(ckpt)[:max(1, max_pos // 2)]
    if len(prompt) + tokens > max_pos:
        tokens = max_pos - len(prompt)
        notes.append(f"tokens cut to {tokens}: the model has {max_pos} positions")
    if tokens < 2:
        raise OffloadMoeError(f"tune: the prompt leaves no room to decode in {max_pos} positions")
    context = min(max_pos, len(prompt) + tokens + 1)
    base_placement = (placement or Placement()).override(context_length=context)
    measurements = {}
    if measure:
        group = ckpt.quant.group_size if ckpt.quant is not None else 64
        group = pick_group_size(cfg.hidden_size, cfg.intermediate_size, group)
        widths = EXPERT_BITS + ((bits["experts"],) if bits["experts"] not in EXPERT_BITS else ())
        spec = ExpertSpec(cfg.hidden_size, cfg.intermediate_size, DTYPES[cfg.torch_dtype], group, layout.nbytes)
        measurements = measure_machine(dev, spec, bits=widths, disk_bytes=disk_bytes, disk_dir=base, progress=report)

    # on CUDA the hybrid engine (`load(cpu_experts="auto")`) takes its cost model from these figures
    costs = cost_model(measurements, source="offload-moe tune (measuring)")
    total = len(stages[0]) + (2 + 1 if settings is None else 0)
    deadline_all = started + time_budget  # measurements included
    trial = Trial(ckpt, dev, prompt, tokens, base_placement, costs, setting_seconds, deadline_all, base, report)
    report("settings", 0, total)
    rows, skipped = run_stages(stages, trial.run, cfg.num_experts, deadline_all,
                               lambda done: report("settings", done, total))
    report("settings", total, total)
    best = pick_best(rows)
    default = Setting(fit, stages[0][0].prefetch, "ram") if settings is None else None
    best = confirm_against_default(rows, best, default, trial.run, rounds=2,
                                   deadline=deadline_all + setting_seconds * 4, notes=notes)
    summary = (f"{cfg.model_type}, {cfg.num_layers} layers × {cfg.num_experts} experts, top-{cfg.top_k}, "
               f"experts {bits['experts']} ({fmt_bytes(layout.nbytes)} each)")
    return TuneResult(model=str(Path(model_path).resolve()), model_summary=summary, device=str(dev),
                      device_type=dev.type, bits=bits, vram_budget=vram, tokens=tokens,
                      prompt_tokens=len(prompt), measurements=measurements, rows=rows, best=best,
                      skipped=skipped, date=datetime.now().astimezone().isoformat(timespec="seconds"),
                      seconds=time.perf_counter() - started, notes=notes)
