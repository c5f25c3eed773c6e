"""The engine row's settings: slots per layer, prefetch depth and the VRAM limit, from the arguments,
else the profile, else the defaults; and the VRAM limit applied to the process."""

from __future__ import annotations

import torch

from ..base.errors import OffloadMoeError
from ..placement.options import from_profile
from ..placement.profiles import Profile, load_profile
from ..base.runtime import parse_bytes


def show_slots(slots) -> str:
    return "/".join(map(str, slots)) if isinstance(slots, list) else str(slots)


def resolve_settings(cfg, device, dtype, cache_slots, prefetch, profile, vram_limit, notes):
    """The engine row's slots and prefetch depth, and the VRAM limit: given values first, then the
    profile's placement (the same planner `load(profile=...)` uses), then the defaults."""
    E, k = cfg.num_experts, cfg.top_k
    placement = from_profile(profile or None, cfg, device, dtype)
    if profile:
        if cache_slots is None and placement.cache_slots is not None:
            cache_slots = placement.cache_slots
            notes.append(f"Slots per layer from profile {placement.profile}: {cache_slots}.")
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
        prefetch = placement.prefetch
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


def apply_vram_limit(limit, device, notes) -> dict:
    """Cap the process's GPU memory at `limit` bytes (`set_per_process_memory_fraction`); what was
    done, for the result."""
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
