"""Which resident expert to evict from a layer's slots: one small class per policy.

`LRU` is the default (routing is local in time: an expert used now is likely used again soon).
`Belady` is the offline optimum (evict the expert whose next use is farthest away); it needs the
future, so it is fed a recorded routing trace and exists to state hit rates as a fraction of the
best possible. `simulate` replays a trace through a policy without any weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class LRU:
    """Least recently used first."""

    reuse = True  # experts stay resident between steps

    def __init__(self):
        self.order: OrderedDict[int, None] = OrderedDict()

    def step(self, experts: Sequence[int]) -> None:
        """Called once per use of the layer with the experts it needs (LRU needs nothing)."""

    def touch(self, expert: int) -> None:
        self.order[expert] = None
        self.order.move_to_end(expert)

    def forget(self, expert: int) -> None:
        self.order.pop(expert, None)

    def victim(self, candidates: set[int]) -> int:
        for e in self.order:
            if e in candidates:
                return e
        return min(candidates)


class NoReuse(LRU):
    """Nothing survives a step: every use is a copy. The on-demand-loading baseline of benchmarks."""

    reuse = False


class Belady:
    """Evict the candidate whose next use in the recorded future is farthest (or never)."""

    reuse = True

    def __init__(self, future: Sequence[Sequence[int]]):
        self.future = [set(s) for s in future]
        self.t = -1

    def step(self, experts: Sequence[int]) -> None:
        self.t += 1

    def touch(self, expert: int) -> None:
        pass

    def forget(self, expert: int) -> None:
        pass

    def next_use(self, expert: int) -> int:
        for t in range(self.t + 1, len(self.future)):
            if expert in self.future[t]:
                return t
        return len(self.future) + expert  # never again: evict first (ties broken by id)

    def victim(self, candidates: set[int]) -> int:
        return max(sorted(candidates), key=self.next_use)


def simulate(trace: Sequence[Sequence[int]], slots: int, policy) -> tuple[int, int]:
    """Replay one layer's trace (experts needed per step) through `slots` slots: (hits, misses).

    Same rules as the engine: experts already resident are used first; each miss evicts a victim
    among residents not still needed in this step (an empty slot first)."""
    resident: set[int] = set()
    hits = misses = 0
    for needed in trace:
        needed = sorted(set(needed))
        policy.step(needed)
        if not policy.reuse:
            resident.clear()
        pending = set(needed)
        step_misses = [e for e in needed if e not in resident]
        for e in needed:
            if e in resident:
                hits += 1
                policy.touch(e)
                pending.discard(e)
        for e in step_misses:
            misses += 1
            if len(resident) >= slots:
                out = policy.victim(resident - pending)
                resident.discard(out)
                policy.forget(out)
            resident.add(e)
            policy.touch(e)
            pending.discard(e)
    return hits, misses


POLICIES = {"lru": LRU, "none": NoReuse}
