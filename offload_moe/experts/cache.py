"""The expert engine: per layer a fixed set of device slots in front of the host store.

`fetch(layer, experts, residual)` is the one place that decides where each expert use gets its
weights from: a slot it already occupies (a hit, perhaps thanks to prefetch), or a copy from the
host tier into a free or least-recently-used slot (a miss). It hands out resident experts first,
so they compute while the misses are still copying, and never evicts an expert the layer still
needs. Before handing anything out it also guesses the next layers' experts (their routers applied
to the current residual stream) and starts copying those ahead: a wrong guess costs bandwidth,
never correctness, because every use is checked against what is actually resident.

On CUDA, copies run on a side stream; each slot has a `ready` event (copy done; compute waits on
it) and a `released` event (compute done with the old occupant; the next copy into the slot waits
on it), so nothing blocks the host. On CPU the same logic runs with synchronous copies, which is
how every piece of it is tested without a GPU. Slots are allocated once here; nothing is allocated
per token.

With a CPU tier (`cpu=`, `costs=`: the hybrid), a miss may instead be computed by the CPU where the
expert sits in host RAM (`_choose_cpu` decides, from a measured cost model); its weights are then
CPU tensors and the model moves the activations over and back. Those experts are handed out last,
after every hit and copy has been queued on the device, so on CUDA the CPU computes them while the
device works through the others; their activations travel on a side stream that waits only for the
layer's inputs, not for the device work queued before them (see `_on_cpu`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch

from ..cpu.kernels import expert_format
from .costs import CostModel
from .layout import ExpertLayout
from .policy import LRU
from .store import HostStore
from .interface import ExpertWeights


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    bytes_moved: int = 0
    stall_seconds: float = 0.0
    tokens: int = 0
    cpu_computed: int = 0            # misses the CPU computed where they sit (counted in misses too)
    bytes_not_moved: int = 0         # what copying those would have moved
    est_seconds_saved: float = 0.0   # by the cost model: all-copied time minus the hybrid's

    def add(self, other: "LayerStats"):
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class ExpertCache:
    def __init__(self, store: HostStore, *, device: torch.device, slots: list[int], prefetch: int = 1,
                 policy: Callable[[int], object] = lambda layer: LRU(), record_trace: bool = False,
                 cpu=None, costs: CostModel | None = None, recent: int = 2):
        L, E = store.num_layers, store.num_experts
        if len(slots) != L or any(not 1 <= k <= E for k in slots):
            raise ValueError(f"slots per layer must be {L} values in 1..{E}, got {slots}")
        self.store, self.device, self.depth = store, torch.device(device), prefetch
        self.layout: ExpertLayout = store.layout
        self.slots = list(slots)
        # Device slots: one (K, nbytes) buffer per layer, and ExpertWeights views built once.
        self.buffers = [torch.empty((k, self.layout.nbytes), dtype=torch.uint8, device=self.device) for k in slots]
        self.views = [[self.layout.view(buf[s]) for s in range(k)] for buf, k in zip(self.buffers, slots)]
        self.slot_of: list[dict[int, int]] = [{} for _ in range(L)]     # expert -> slot
        self.holder = [[-1] * k for k in slots]                         # slot -> expert (-1 empty)
        self.prefetched: list[set[int]] = [set() for _ in range(L)]     # copied ahead, not used yet
        self.policies = [policy(layer) for layer in range(L)]
        self.layer_stats = [LayerStats() for _ in range(L)]
        self.trace: list[list[list[int]]] | None = [[] for _ in range(L)] if record_trace else None
        self.guess: Callable[[int, torch.Tensor], torch.Tensor] | None = None
        self.cuda = self.device.type == "cuda"
        # The hybrid: a `CpuTier` the CPU computes from, the cost model, each layer's last steps.
        if (cpu is None) != (costs is None):
            raise ValueError("the CPU tier and the cost model go together: pass both cpu= and costs= or neither")
        self.cpu, self.costs = cpu, costs
        self.device_format = expert_format(self.views[0][0]) if costs else None
        self.recent: list[deque[frozenset[int]]] = [deque(maxlen=recent) for _ in range(L)]
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready = [[torch.cuda.Event() for _ in range(k)] for k in slots]
            self.released = [[torch.cuda.Event() for _ in range(k)] for k in slots]
            # pageable sources (the disk tier) are staged through two pinned buffers in turn
            self.staging = [torch.empty(self.layout.nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self.staging_done = [torch.cuda.Event() for _ in range(2)]
            self.next_staging = 0
            self.stall_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
            if cpu is not None:
                self.cpu_stream = torch.cuda.Stream(self.device)   # activations to and from the CPU
                self.inputs_ready = torch.cuda.Event()

    def attach_router(self, guess: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        """The model's `guess_experts(layer, residual) -> (N, k) ids`, used for prefetch."""
        self.guess = guess

    # ---- the decision point ----
    def fetch(self, layer: int, experts: list[int], residual: torch.Tensor) -> Iterator[tuple[int, ExpertWeights]]:
        st, policy, resident = self.layer_stats[layer], self.policies[layer], self.slot_of[layer]
        tokens = residual.numel() // residual.shape[-1]
        st.tokens += tokens
        if self.trace is not None:
            self.trace[layer].append(list(experts))
        policy.step(experts)
        if not policy.reuse:
            self._drop_all(layer)
        hits = [e for e in experts if e in resident]
        misses = [e for e in experts if e not in resident]
        on_cpu: list[int] = []
        if self.cpu is not None:
            on_cpu, saved = self._choose_cpu(layer, hits, misses, tokens)
            self.recent[layer].append(frozenset(experts))
            misses = [e for e in misses if e not in on_cpu]
            st.cpu_computed += len(on_cpu)
            st.misses += len(on_cpu)
            st.bytes_not_moved += len(on_cpu) * self.layout.nbytes
            st.est_seconds_saved += saved
        pending = set(experts) - set(on_cpu)        # needed by this layer and not yet computed
        for e in hits:
            st.hits += 1
            policy.touch(e)
            if e in self.prefetched[layer]:
                st.prefetch_used += 1
                self.prefetched[layer].discard(e)
        st.misses += len(misses)
        waiting = list(misses)                      # misses not yet given a slot
        copying: list[tuple[int, int]] = []         # (expert, slot) being copied on demand

        def start_copies():
            while waiting:
                slot = self._claim_slot(layer, pending)
                if slot is None:
                    return                          # every slot holds an expert still needed
                e = waiting.pop(0)
                self._copy_in(layer, e, slot)
                policy.touch(e)
                copying.append((e, slot))

        start_copies()
        self._prefetch(layer, residual)             # queued behind this layer's own copies
        if on_cpu and self.cuda:
            self.inputs_ready.record(torch.cuda.current_stream(self.device))  # before any expert's work
        for e in hits:
            slot = resident[e]
            yield e, self._use(layer, slot, demand=False)
            self._release(layer, slot)
            pending.discard(e)
            start_copies()
        while copying:
            e, slot = copying.pop(0)
            yield e, self._use(layer, slot, demand=True)
            self._release(layer, slot)
            pending.discard(e)
            start_copies()
        if on_cpu:
            yield from self._on_cpu(layer, on_cpu)

    # ---- the CPU tier (the hybrid) ----
    def _choose_cpu(self, layer: int, hits: list[int], misses: list[int], tokens: int) -> tuple[list[int], float]:
        """Which misses the CPU computes where they sit (the rest are copied), and the time that
        saves by the cost model.

        A miss used in one of the layer's last `recent` steps is copied: it is likely to be used
        again, so a slot pays off. The others go one at a time to the lane that finishes them first:
        the device lane (the link copies the expert, the device computes it after the hits) or the
        CPU lane. On CUDA the lanes run side by side; on the CPU they share the cores, so they are
        one lane and the choice is copy + compute vs compute in place. If the plan would not finish
        before copying every miss, every miss is copied. `tokens` is the step's token count, each
        expert's at most (exact in decode): prefill's many tokens make the CPU slow and copies win."""
        if not misses or not self.cpu.has(layer):
            return [], 0.0
        c, nbytes = self.costs, self.layout.nbytes
        copy = c.copy_seconds(nbytes)
        on_device = c.device_seconds(self.device_format, nbytes, tokens)
        on_cpu = c.cpu_seconds(self.cpu.format, self.cpu.nbytes, tokens)
        warm = frozenset().union(*self.recent[layer])

        def plan(hybrid: bool) -> tuple[list[int], float]:
            device = len(hits) * on_device                      # the hits' compute is queued first
            link = cpu = 0.0 if self.cuda else device
            chosen = []
            for e in misses:
                copy_end = max(link + copy, device) + on_device
                cpu_end = cpu + on_cpu
                if hybrid and e not in warm and cpu_end < copy_end:
                    cpu = cpu_end
                    chosen.append(e)
                else:
                    link, device = link + copy, copy_end
                if not self.cuda:
                    link = device = cpu = max(device, cpu)
            return chosen, max(device, cpu)

        chosen, end = plan(hybrid=True)
        _, all_copied = plan(hybrid=False)
        return (chosen, all_copied - end) if chosen and end < all_copied else ([], 0.0)

    def _on_cpu(self, layer: int, experts: list[int]) -> Iterator[tuple[int, ExpertWeights]]:
        """Hand out CPU-tier weights. On CUDA the consumer's work for each (gather its tokens, copy
        them to the host, compute, copy back, scatter) runs on a side stream that waits only for the
        layer's inputs, so the device-to-host copy does not wait for the hits and copies queued
        before it: the CPU computes while the device works. Limitation: the CPU experts run one
        after another in the Python thread, and the layer's sum waits for the last of them."""
        if not self.cuda:
            for e in experts:
                yield e, self.cpu.weights(layer, e)
            return
        compute = torch.cuda.current_stream(self.device)
        self.cpu_stream.wait_event(self.inputs_ready)
        for e in experts:
            with torch.cuda.stream(self.cpu_stream):
                yield e, self.cpu.weights(layer, e)
        compute.wait_stream(self.cpu_stream)          # the layer's sum reads what those rows got

    # ---- slots ----
    def _drop_all(self, layer: int) -> None:
        for e in list(self.slot_of[layer]):
            self.holder[layer][self.slot_of[layer].pop(e)] = -1
            self.policies[layer].forget(e)

    def _claim_slot(self, layer: int, protected: set[int]) -> int | None:
        """An empty slot, or the policy's victim among experts not in `protected`; None if neither."""
        holder = self.holder[layer]
        for s, e in enumerate(holder):
            if e < 0:
                return s
        candidates = {e for e in self.slot_of[layer] if e not in protected}
        if not candidates:
            return None
        victim = self.policies[layer].victim(candidates)
        self.policies[layer].forget(victim)
        self.prefetched[layer].discard(victim)
        slot = self.slot_of[layer].pop(victim)
        holder[slot] = -1
        return slot

    def _copy_in(self, layer: int, expert: int, slot: int) -> None:
        """Start copying one expert from the host tier into a slot."""
        source = self.store.expert(layer, expert)
        target = self.buffers[layer][slot]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.released[layer][slot])
                if not (self.store.pinned and self.store.tier(layer) == "ram"):
                    source, staged = self._stage(source)
                    target.copy_(source, non_blocking=True)
                    staged.record(self.copy_stream)  # after the copy out of the staging buffer
                else:
                    target.copy_(source, non_blocking=True)
                self.ready[layer][slot].record(self.copy_stream)
        else:
            t0 = time.perf_counter()
            target.copy_(source)                    # synchronous: compute waits for all of it
            self.layer_stats[layer].stall_seconds += time.perf_counter() - t0
        self.slot_of[layer][expert] = slot
        self.holder[layer][slot] = expert
        self.layer_stats[layer].bytes_moved += self.layout.nbytes

    def _stage(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Copy pageable bytes (the mmap'd disk tier) into a pinned buffer; the caller records the
        returned event after queueing the copy out of it, so the buffer is reused only then."""
        i = self.next_staging
        self.next_staging ^= 1
        self.staging_done[i].synchronize()          # the previous copy out of this buffer finished
        self.staging[i].copy_(source)               # reads the mmap'd file on the host
        return self.staging[i], self.staging_done[i]

    def _use(self, layer: int, slot: int, demand: bool) -> ExpertWeights:
        """The slot's weights, once the compute stream may read them."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            if demand:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                stream.wait_event(self.ready[layer][slot])
                end.record(stream)
                self.stall_events.append((layer, start, end))
            else:
                stream.wait_event(self.ready[layer][slot])  # a prefetch may still be in flight
        return self.views[layer][slot]

    def _release(self, layer: int, slot: int) -> None:
        """The consumer has queued its compute on the slot: later copies into it wait for that."""
        if self.cuda:
            self.released[layer][slot].record(torch.cuda.current_stream(self.device))

    # ---- prefetch ----
    def _prefetch(self, layer: int, residual: torch.Tensor) -> None:
        """Copy ahead the experts the next `depth` layers' routers pick for this residual stream.

        Only for a single token (decode): a prompt's tokens touch most experts anyway and are
        streamed through the slots by the demand path."""
        if self.depth == 0 or self.guess is None or residual.numel() != residual.shape[-1]:
            return
        for ahead in range(layer + 1, min(layer + 1 + self.depth, len(self.slots))):
            guessed = sorted(set(self.guess(ahead, residual).flatten().tolist()))
            for e in guessed:
                if e in self.slot_of[ahead]:
                    continue
                slot = self._claim_slot(ahead, protected=set(guessed))
                if slot is None:
                    break
                self._copy_in(ahead, e, slot)
                self.policies[ahead].touch(e)
                self.prefetched[ahead].add(e)
                self.layer_stats[ahead].prefetch_issued += 1

    # ---- reporting ----
    def stats(self) -> dict:
        """Totals and per-layer counters; on CUDA this waits for queued work to read stall timers."""
        if self.cuda and self.stall_events:
            torch.cuda.synchronize(self.device)
            for layer, start, end in self.stall_events:
                self.layer_stats[layer].stall_seconds += start.elapsed_time(end) / 1000
            self.stall_events.clear()
        total = LayerStats()
        for s in self.layer_stats:
            total.add(s)
        uses = total.hits + total.misses
        return {
            "hits": total.hits, "misses": total.misses,
            "hit_rate": total.hits / uses if uses else 0.0,
            "prefetch_issued": total.prefetch_issued, "prefetch_used": total.prefetch_used,
            "prefetch_accuracy": total.prefetch_used / total.prefetch_issued if total.prefetch_issued else 0.0,
            "bytes_moved": total.bytes_moved, "stall_seconds": total.stall_seconds, "tokens": total.tokens,
            "cpu_computed": total.cpu_computed, "bytes_not_moved": total.bytes_not_moved,
            "est_seconds_saved": total.est_seconds_saved,
            "slots_per_layer": list(self.slots), "bytes_per_expert": self.layout.nbytes,
            "per_layer": [vars(s).copy() for s in self.layer_stats],
        }

    def reset_stats(self) -> None:
        self.layer_stats = [LayerStats() for _ in self.slots]
