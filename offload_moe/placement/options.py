"""Where `load()` puts things, as one frozen value: the planner fills it from a profile
(`from_profile`), the fields the caller's `Placement` sets (not None) override the plan's (`override`,
i.e. `dataclasses.replace` with the values given), unset fields take the engine's defaults (`filled`),
and `load()` reads it once.

    load(path, Placement(cache_slots=4, offload="disk"))   # the profile's plan, these two fields replaced
    load(path, Placement(cache_slots=2), profile=None)     # no plan: these fields, the defaults for the rest
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..base.errors import OffloadMoeError
from .planner import auto_profile
from .planner import plan as make_plan
from .profiles import Profile, load_profile


@dataclass(frozen=True)
class Placement:
    """Every field None means "the plan's, else the default" (`DEFAULTS`)."""
    context_length: int | None = None   # tokens the KV cache holds (None: the model's, at most 4096)
    cache_slots: int | list[int] | str | None = None  # None/"all": every expert resident; else device slots per layer
    prefetch: int | None = None         # MoE layers ahead the engine copies guessed experts (1)
    offload: str | None = None          # the host tier of experts without a slot: "ram" (default) or "disk"
    ram_budget: int | str | None = None  # bytes of RAM for the host tier (the rest on disk)
    offload_dir: str | Path | None = None
    policy: str | None = None           # slot eviction (`experts.policy.POLICIES`; "lru")
    cpu_experts: str | int | None = None  # which experts the CPU computes (`experts/cpu_tier.py`; "auto")
    cpu_costs: object | None = None     # the hybrid tier's `experts.costs.CostModel` (None: saved or measured)
    nf4_experts: bool | None = None     # quantize float experts to NF4 at load (False)
    record_trace: bool | None = None    # the engine records each layer's experts per step (False)
    force_context: bool | None = None   # allow a context beyond the model's max_position_embeddings (False)
    profile: str | None = None          # the profile this was planned from

    def filled(self) -> Placement:
        """Unset fields given their defaults."""
        return replace(self, **{k: v for k, v in DEFAULTS.items() if getattr(self, k) is None})

    def given(self) -> dict:
        """The fields this value sets (not None)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def override(self, **given) -> Placement:
        """These fields replaced by the given values that are not None."""
        names = {f.name for f in fields(self)}
        unknown = set(given) - names
        if unknown:
            raise TypeError(f"Placement has no field {sorted(unknown)[0]!r}")
        return replace(self, **{k: v for k, v in given.items() if v is not None})


DEFAULTS = dict(prefetch=1, offload="ram", policy="lru", cpu_experts="auto", nf4_experts=False, record_trace=False,
                force_context=False)


def from_profile(profile: str | Path | Profile | None, cfg, device: torch.device, dtype: torch.dtype,
                 mapped: bool = False) -> Placement:
    """The planner's placement for a profile (a name, a .toml path, a `Profile`, "auto" or None).
    mapped: the CPU will compute from the file's mapping (`planner.plan`'s mapped plans)."""
    if profile is None:
        return Placement().filled()
    if isinstance(profile, Profile):
        prof = profile
    elif profile == "auto":
        prof = auto_profile(cfg) if device.type == "cuda" else load_profile("cpu")
    else:
        prof = load_profile(profile)
    if not cfg.quantization:  # plan for the weights as they will be held: the compute dtype
        bits = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        prof = replace(prof, experts_bits=bits, attention_bits=bits, embeddings_bits=bits)
    if prof.device == "cuda" and device.type != "cuda":
        raise OffloadMoeError(f"profile {prof.name!r} is for a CUDA GPU but the device is {device}; "
                              "use profile='cpu' or device='cuda'")
    p = make_plan(cfg, prof, mapped=mapped)
    slots = None
    if p.mapped:  # every expert mapped, or a RAM expert cache before the file
        slots = p.slots_per_layer or None
    elif prof.device == "cuda":
        slots = "all" if p.slots_per_layer >= cfg.num_experts else p.slots_per_layer
    elif prof.cache_slots is not None:  # a profile (e.g. a tuned one) that names its slots gets them
        slots = min(prof.cache_slots, cfg.num_experts)
    elif p.experts_on_disk:  # the CPU computes from RAM; layers that do not fit stream from disk
        slots = min(cfg.num_experts, 2 * cfg.top_k)
    return Placement(context_length=p.kv_tokens, cache_slots=slots, prefetch=p.profile.prefetch, offload=prof.offload,
                     ram_budget=p.ram_budget, profile=prof.name).filled()
