"""The expert engine: per layer a fixed set of device slots in front of the host store.

`fetch(layer, experts, tokens, guesses)` (the `ExpertProvider` interface) is the one place that
decides where each expert use gets its weights from: a slot it already occupies (a hit, perhaps
thanks to prefetch), or a copy from the host tier into a free or least-recently-used slot (a miss).
It hands out resident experts first, so they compute while the misses are still copying, and never
evicts an expert the layer still needs. The model hands over its guesses of the next layers'
experts with the request; once the hits are queued (so reading a disk-tier expert into a staging
buffer never delays this layer's compute) they are copied ahead: a wrong guess costs bandwidth,
never correctness, because every use is checked against what is actually resident.

On CUDA, copies run on a side stream; each slot has a `ready` event (copy done; compute waits on
it) and a `released` event (compute done with the old occupant; the next copy into the slot waits
on it), so nothing blocks the host. On CPU the same logic runs with synchronous copies, which is
how every piece of it is tested without a GPU. Slots are allocated once here; nothing is allocated
per token.

With a CPU tier (`cpu=`, `costs=`: the hybrid), a miss may instead be computed by the CPU where the
expert sits in host RAM (`_choose_cpu` decides, from a measured cost model). Those experts are
handed out last, after every hit and copy has been queued on the device, so on CUDA the CPU
computes them while the device works through the others; the cache moves their activations on a
side stream that waits only for the layer's inputs, not for the device work queued before them
(`StreamedCpuExpert`). The model only calls the experts it is given.

Copy time is counted here (`stats()["copy_seconds"]`: host clock on the CPU, CUDA events on the
copy stream, read when stats are), so benchmarks read it instead of wrapping the cache. `close()`
waits for copies still in flight (a prefetch nobody waited for) before the slots can be freed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import torch

from ..base.runtime import host_buffer
from .cpu_kernels import expert_format
from .costs import CostModel
from .layout import ExpertLayout
from ..model.expert_interface import Activation, Expert, ExpertWeights
from .policy import LRU
from .store import HostStore


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    bytes_moved: int = 0
    copy_seconds: float = 0.0        # host-to-device copies, demand and prefetch (what bench's bound uses)
    stall_seconds: float = 0.0
    tokens: int = 0
    cpu_computed: int = 0            # misses the CPU computed where they sit (counted in misses too)
    bytes_not_moved: int = 0         # what copying those would have moved
    est_seconds_saved: float = 0.0   # by the cost model: all-copied time minus the hybrid's

    def add(self, other: "LayerStats"):
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class StreamedCpuExpert(Expert):
    """A CPU-tier expert of a CUDA model: gather its tokens, copy them to the host, compute, copy the
    result back, all on the cache's side stream, which waits only for the layer's inputs (recorded
    when the layer's fetch began); the compute stream waits for the result before using it."""

    __slots__ = ("cache",)

    def __init__(self, weights: ExpertWeights, activation: Activation, cache: "ExpertCache"):
        super().__init__(weights, activation)
        self.cache = cache

    def __call__(self, h: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        side, compute = self.cache.cpu_stream, torch.cuda.current_stream(h.device)
        side.wait_event(self.cache.inputs_ready)                      # h and tokens, not the hits' work
        with torch.cuda.stream(side):
            y = super().__call__(h, tokens)                           # (n, H) back on the device
        compute.wait_stream(side)
        y.record_stream(compute)                                      # made on the side stream, used here
        return y


@dataclass(frozen=True)
class Hybrid:
    """The hybrid engine's CPU side: the `CpuTier` the CPU computes from, the cost model that says
    whether a miss is copied or computed there, and how many of a layer's last steps count as recent
    (a miss used in them is copied: it is likely to be used again)."""
    tier: object
    costs: CostModel
    recent: int = 2


class ExpertCache:
    def __init__(self, store: HostStore, *, device: torch.device, slots: list[int], prefetch: int = 1,
                 policy: Callable[[int], object] = lambda layer: LRU(), record_trace: bool = False,
                 hybrid: Hybrid | None = None, activation: Activation = Activation()):
        L, E = store.num_layers, store.num_experts
        if len(slots) != L or any(not 1 <= k <= E for k in slots):
            raise ValueError(f"slots per layer must be {L} values in 1..{E}, got {slots}")
        self.store, self.device, self.prefetch_depth = store, torch.device(device), prefetch
        self.layout: ExpertLayout = store.layout
        self.slots = list(slots)
        # Device slots: one (K, nbytes) buffer per layer, and ExpertWeights views built once.
        self.buffers = [host_buffer((k, self.layout.nbytes)) if self.device.type == "cpu" else
                        torch.empty((k, self.layout.nbytes), dtype=torch.uint8, device=self.device) for k in slots]
        self.views = [[self.layout.view(buf[s]) for s in range(k)] for buf, k in zip(self.buffers, slots)]
        self.experts = [[Expert(w, activation) for w in views] for views in self.views]  # what fetch hands out
        self.slot_of: list[dict[int, int]] = [{} for _ in range(L)]     # expert -> slot
        self.holder = [[-1] * k for k in slots]                         # slot -> expert (-1 empty)
        self.prefetched: list[set[int]] = [set() for _ in range(L)]     # copied ahead, not used yet
        self.policies = [policy(layer) for layer in range(L)]
        self.layer_stats = [LayerStats() for _ in range(L)]
        self.trace: list[list[list[int]]] | None = [[] for _ in range(L)] if record_trace else None
        self.cuda = self.device.type == "cuda"
        # The hybrid: a `CpuTier` the CPU computes from, the cost model, each layer's last steps.
        cpu, costs, recent = (hybrid.tier, hybrid.costs, hybrid.recent) if hybrid else (None, None, 2)
        if (cpu is None) != (costs is None):
            raise ValueError("the CPU tier and the cost model go together: a Hybrid needs both")
        self.cpu, self.costs = cpu, costs
        self.device_format = expert_format(self.views[0][0]) if costs else None
        self.recent: list[deque[frozenset[int]]] = [deque(maxlen=recent) for _ in range(L)]
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            for buf in self.buffers:                # written on the copy stream: free only after its copies
                buf.record_stream(self.copy_stream)
            self.ready = [[torch.cuda.Event() for _ in range(k)] for k in slots]
            self.released = [[torch.cuda.Event() for _ in range(k)] for k in slots]
            # pageable sources (the disk tier) are staged through two pinned buffers in turn
            self.staging = [torch.empty(self.layout.nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self.staging_done = [torch.cuda.Event() for _ in range(2)]
            self.next_staging = 0
            self.stall_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
            self.copy_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
            if cpu is not None:
                self.cpu_stream = torch.cuda.Stream(self.device)   # activations to and from the CPU
                self.inputs_ready = torch.cuda.Event()
        # A store that reads the source file (`source.SourceStore`, CPU only): each slot's read in flight.
        self.reads = [[None] * k for k in slots] if hasattr(store, "submit") and not self.cuda else None
        cpu_expert = (lambda w: StreamedCpuExpert(w, activation, self)) if self.cuda else (lambda w: Expert(w, activation))
        self.cpu_experts = ({layer: [cpu_expert(w) for w in weights] for layer, weights in cpu.layers.items()}
                            if cpu is not None else {})

    # ---- the decision point ----
    def fetch(self, layer: int, experts: list[int], tokens: int,
              guesses: Sequence[list[int]] = ()) -> Iterator[tuple[int, Expert]]:
        st, policy, resident = self.layer_stats[layer], self.policies[layer], self.slot_of[layer]
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
        if self.reads is not None and len(misses) > 1:  # the source file: every miss read ahead by the kernel
            self.store.will_need(layer, misses)
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
        if on_cpu and self.cuda:
            self.inputs_ready.record(torch.cuda.current_stream(self.device))  # before any expert's work
        for e in hits:
            slot = resident[e]
            yield e, self._use(layer, slot, demand=False)
            self._release(layer, slot)
            pending.discard(e)
            start_copies()
        for ahead, guessed in enumerate(guesses[:self.prefetch_depth], start=layer + 1):
            if ahead < len(self.slots):             # after the hits are queued, behind this layer's copies
                self.prefetch(ahead, guessed)
        while copying:
            e, slot = copying.pop(0)
            yield e, self._use(layer, slot, demand=True)
            self._release(layer, slot)
            pending.discard(e)
            start_copies()
        for e in on_cpu:
            yield e, self.cpu_experts[layer][e]

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
        target = self.buffers[layer][slot]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.released[layer][slot])
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)      # a disk read into staging counts as copy time
                if not (self.store.pinned and self.store.tier(layer) == "ram"):
                    source, staged = self._stage(layer, expert)
                    target.copy_(source, non_blocking=True)
                    staged.record(self.copy_stream)  # after the copy out of the staging buffer
                else:
                    target.copy_(self.store.expert(layer, expert), non_blocking=True)
                end.record(self.copy_stream)
                self.ready[layer][slot].record(self.copy_stream)
                self.copy_events.append((layer, start, end))
                if len(self.copy_events) > 4096:    # no stats() for a long while: fold in what finished
                    self._fold_timers(self.copy_events, "copy_seconds")
        elif self.reads is not None:                # the source file: a pread on the I/O thread
            self.reads[layer][slot] = self.store.submit(layer, expert, target)
        else:
            t0 = time.perf_counter()
            target.copy_(self.store.expert(layer, expert))  # synchronous: compute waits for all of it
            seconds = time.perf_counter() - t0
            self.layer_stats[layer].stall_seconds += seconds
            self.layer_stats[layer].copy_seconds += seconds
        self.slot_of[layer][expert] = slot
        self.holder[layer][slot] = expert
        self.layer_stats[layer].bytes_moved += self.layout.nbytes

    def _stage(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        """An expert's pageable bytes (the mmap'd disk tier, or the source file itself: a pread of
        its ranges, `SourceStore.read_into`) in a pinned buffer; the caller records the returned
        event after queueing the copy out of it, so the buffer is reused only then."""
        i = self.next_staging
        self.next_staging ^= 1
        self.staging_done[i].synchronize()          # the previous copy out of this buffer finished
        if hasattr(self.store, "read_into"):
            self.store.read_into(layer, expert, self.staging[i])
        else:
            self.staging[i].copy_(self.store.expert(layer, expert))  # reads the mmap'd file on the host
        return self.staging[i], self.staging_done[i]

    def _use(self, layer: int, slot: int, demand: bool) -> Expert:
        """The slot's weights, once the compute stream may read them."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            if demand:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                stream.wait_event(self.ready[layer][slot])
                end.record(stream)
                self.stall_events.append((layer, start, end))
                if len(self.stall_events) > 4096:
                    self._fold_timers(self.stall_events, "stall_seconds")
            else:
                stream.wait_event(self.ready[layer][slot])  # a prefetch may still be in flight
        elif self.reads is not None and self.reads[layer][slot] is not None:
            read, self.reads[layer][slot] = self.reads[layer][slot], None
            if not read.done():
                t0 = time.perf_counter()
                read.result()
                self.layer_stats[layer].stall_seconds += time.perf_counter() - t0
            read.result()                           # a failed read raises here, in the caller
        return self.experts[layer][slot]

    def _release(self, layer: int, slot: int) -> None:
        """The consumer has queued its compute on the slot: later copies into it wait for that."""
        if self.cuda:
            self.released[layer][slot].record(torch.cuda.current_stream(self.device))

    # ---- prefetch ----
    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Copy ahead the experts the model guessed `layer` will use (distinct ids; the model guesses
        in decode only: a prompt's tokens touch most experts anyway and stream through the slots by
        the demand path). Never claims a slot of an expert in `experts`."""
        protected = set(experts)
        for e in experts:
            if e in self.slot_of[layer]:
                continue
            slot = self._claim_slot(layer, protected=protected)
            if slot is None:
                break
            self._copy_in(layer, e, slot)
            self.policies[layer].touch(e)
            self.prefetched[layer].add(e)
            self.layer_stats[layer].prefetch_issued += 1

    def _fold_timers(self, events: list, field: str) -> None:
        """Add the finished (layer, start, end) timers to the layer counters, without waiting."""
        done = 0
        for layer, start, end in events:
            if not end.query():
                break
            st = self.layer_stats[layer]
            setattr(st, field, getattr(st, field) + start.elapsed_time(end) / 1000)
            done += 1
        del events[:done]

    # ---- reporting ----
    def stats(self) -> dict:
        """Totals and per-layer counters; on CUDA this waits for queued work to read stall timers."""
        if self.cuda and (self.stall_events or self.copy_events):
            torch.cuda.synchronize(self.device)
            for layer, start, end in self.stall_events:
                self.layer_stats[layer].stall_seconds += start.elapsed_time(end) / 1000
            for layer, start, end in self.copy_events:
                self.layer_stats[layer].copy_seconds += start.elapsed_time(end) / 1000
            self.stall_events.clear()
            self.copy_events.clear()
        total = LayerStats()
        for s in self.layer_stats:
            total.add(s)
        uses = total.hits + total.misses
        read = getattr(self.store, "bytes_read", None)  # the source file's bytes read, per layer
        return {
            "hits": total.hits, "misses": total.misses,
            "hit_rate": total.hits / uses if uses else 0.0,
            "prefetch_issued": total.prefetch_issued, "prefetch_used": total.prefetch_used,
            "prefetch_accuracy": total.prefetch_used / total.prefetch_issued if total.prefetch_issued else 0.0,
            "bytes_moved": total.bytes_moved, "copy_seconds": total.copy_seconds,
            "stall_seconds": total.stall_seconds, "tokens": total.tokens,
            "cpu_computed": total.cpu_computed, "bytes_not_moved": total.bytes_not_moved,
            "est_seconds_saved": total.est_seconds_saved,
            "slots_per_layer": list(self.slots), "bytes_per_expert": self.layout.nbytes,
            "per_layer": [vars(s).copy() | {"hit_rate": s.hits / (s.hits + s.misses) if s.hits + s.misses else 0.0}
                          for s in self.layer_stats],
            **({"bytes_read_per_layer": list(read)} if read is not None else {}),
        }

    def reset_stats(self) -> None:
        """Counters back to zero, timers still in flight dropped (they belong to before the reset)."""
        if self.cuda:
            self.stall_events.clear()
            self.copy_events.clear()
        self.layer_stats = [LayerStats() for _ in self.slots]
        if getattr(self.store, "bytes_read", None) is not None:
            self.store.bytes_read = [0] * len(self.slots)

    def close(self) -> None:
        """Wait for every copy still in flight (a prefetch for a wrong guess is waited on by nobody),
        so the slot buffers can be freed safely. Also run when the cache is collected; the buffers are
        marked as used by the copy stream too (`record_stream`), so the allocator never hands their
        memory out while a copy into them is queued."""
        if self.cuda:
            self.copy_stream.synchronize()
        if self.reads is not None:
            for row in self.reads:
                for read in row:
                    if read is not None:
                        read.exception()            # waits; a wrong guess's failed read is dropped
            self.store.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter teardown: CUDA may already be gone
            pass
