"""Generation arguments checked once, before any work: numbers that are numbers (finite, in range,
not bool), a seed torch can take, stop strings that are non-empty strings. One line each."""

from __future__ import annotations

import math

from .errors import OffloadMoeError

MIN_SEED, MAX_SEED = -2**63, 2**64 - 1  # what torch.Generator.manual_seed takes


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_sampling(max_new_tokens, temperature, top_p, top_k, seed, stop) -> None:
    if not _int(max_new_tokens) or max_new_tokens < 1:
        raise OffloadMoeError(f"max_new_tokens = {max_new_tokens!r}, expected an integer >= 1")
    if not _number(temperature) or temperature < 0:
        raise OffloadMoeError(f"temperature = {temperature!r}, expected a finite number >= 0 (0 is greedy)")
    if not _number(top_p) or not 0 < top_p <= 1:
        raise OffloadMoeError(f"top_p = {top_p!r}, expected a number with 0 < top_p <= 1")
    if not _int(top_k) or top_k < 0:
        raise OffloadMoeError(f"top_k = {top_k!r}, expected an integer >= 0 (0: no top-k cut)")
    if seed is not None and (not _int(seed) or not MIN_SEED <= seed <= MAX_SEED):
        shown = repr(seed) if len(repr(seed)) <= 40 else f"{repr(seed)[:20]}... ({len(repr(seed))} digits)"
        raise OffloadMoeError(f"seed = {shown}, expected an integer in -2**63..2**64-1")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise OffloadMoeError(f"stop = {stop!r}, expected a string or a list of strings")
    if any(s == "" for s in stops):
        raise OffloadMoeError("stop = '': an empty stop string would end every generation at once "
                              "(expected non-empty strings)")
