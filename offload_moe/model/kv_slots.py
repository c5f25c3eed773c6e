"""Which tokens each row ("slot") of the KV cache holds, and the finished sequences' caches kept
beyond them, so that a new prompt sharing a prefix of token ids with an earlier sequence prefills
only the rest (chat turns, a repeated system prompt, tool loops, a server's requests).

A sequence `claim`s a free slot for its prompt: the slot, or the kept sequence, whose token ids
share the longest prefix with the prompt wins; a kept sequence is copied into the slot first.
Whatever the claimed slot held beyond the shared prefix is kept (copied out, host memory) before
it is overwritten. Kept sequences live under a byte budget, least recently used out first. At
least one prompt token is always left to prefill: its logits start the generation.

Context shift (llama.cpp's `--context-shift`): when the prompt leaves the slot's tokens after a
shared prefix and rejoins them further on (a chat that outgrew the context and dropped its oldest
turns: the system prompt, then the newest turns), the rejoined stretch's keys and values are moved
down to follow the prefix (`Transformer.shift_kv` rotates the keys to their new positions) and
only what follows it is prefilled. The moved entries still carry what attention saw of the dropped
turns, as in llama.cpp: close to a fresh prefill, not equal to it.

The bookkeeping is exact by construction: a slot's `ids` are the tokens whose keys and values
were written at positions 0..len-1 (`wrote` is called after a forward pass succeeded), so the
positions reused hold what a fresh prefill would compute there. Each claim gets a lease number;
a sequence whose slot was taken over (a generation abandoned without being closed, then resumed
after another one started) is refused rather than allowed to write into another sequence's cache.

Models with recurrent layers (Gated DeltaNet, `recurrent`): a slot's recurrent state is that of
its whole sequence and cannot be cut back to a shorter prefix, so a prompt reuses a slot only when
it extends everything the slot holds; nothing is kept beyond the slots (their states would have to
be kept too) and there is no context shift. The layers start from a zero state at position 0. A
forward pass that raised may have left a slot's state part-way (`stale`): that slot is not reused.

Shape letters: L layers, nkv key-value heads, S positions, hd head dim.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .attention import KVCache
from ..base.errors import OffloadMoeError

DEFAULT_KEEP_BYTES = 512 * 2 ** 20   # kept (finished, displaced) sequences' keys and values
MIN_SHIFT_TOKENS = 8                  # a context shift moves at least this many tokens' keys and values
MAX_SHIFT_CANDIDATES = 64             # where the rest of a prompt may rejoin a slot's tokens (checked)


def shared_prefix(a, b) -> int:
    """How many leading ids a and b have in common."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVSlots:
    """The slots of the transformer's KV caches (`caches[layer]` of shape (slots, nkv, S, hd)) and
    the kept sequences beyond them."""

    def __init__(self, caches: list[KVCache], keep_bytes: int = DEFAULT_KEEP_BYTES, shift=None,
                 recurrent: bool = False):
        self.caches = caches
        self.recurrent = recurrent  # some layers hold a recurrent state: whole-slot reuse only
        self.stale: set[int] = set()  # recurrent: slots a forward pass is writing (or raised while writing)
        self.shift = shift        # shift(slot, src, dst, n): the transformer's context shift (`Transformer.shift_kv`)
        n = caches[0].k.shape[0] if caches else 1
        self.ids: list[list[int]] = [[] for _ in range(n)]   # per slot: the tokens its cache holds
        self.lease = [0] * n                                  # per slot: the current owner's number (0: free)
        self.used = [0] * n                                   # per slot: when it was last claimed
        self.keep_bytes = keep_bytes
        self.kept: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.kept_bytes = 0
        self.clock = 0
        self.position_bytes = sum(c.k[0, :, 0].numel() * c.k.element_size() + c.v[0, :, 0].numel() * c.v.element_size()
                                  for c in caches)           # one position's keys and values, all layers

    @property
    def count(self) -> int:
        return len(self.ids)

    def free(self) -> list[int]:
        return [s for s in range(self.count) if not self.lease[s]]

    def claim(self, prompt: list[int], reuse: bool = True) -> tuple[int, int, int]:
        """A slot for `prompt` -> (slot, lease, positions reused). Without a free slot, the least
        recently claimed one is taken over (its owner is then refused by `check`)."""
        self.clock += 1
        free = self.free() or [min(range(self.count), key=lambda s: self.used[s])]
        limit = len(prompt) - 1                               # at least one token is prefilled
        best = max(free, key=lambda s: (self._reusable(s, prompt, limit) if reuse else 0, -self.used[s]))
        reused = self._reusable(best, prompt, limit) if reuse else 0
        entry, from_kept = None, 0
        if reuse and not self.recurrent:
            for key in self.kept:
                n = min(shared_prefix(key, prompt), limit)
                if n > max(reused, from_kept):
                    entry, from_kept = key, n
        if entry is not None:  # a kept sequence shares more: the LRU free slot takes it
            best = min(free, key=lambda s: self.used[s])
            self._keep(best, 0)
            self._restore(best, entry)
            reused = from_kept
        else:
            moved = self._shift(best, prompt, reused) if reuse and reused < limit else 0
            self._keep(best, reused + moved)
            reused += moved
        self.ids[best] = self.ids[best][:reused]
        self.lease[best] = self.clock
        self.used[best] = self.clock
        return best, self.clock, reused

    def _reusable(self, slot: int, prompt: list[int], limit: int) -> int:
        """Positions of the slot the prompt can start from (recurrent: all the slot holds, or none)."""
        n = min(shared_prefix(self.ids[slot], prompt), limit)
        return n if not self.recurrent or (n == len(self.ids[slot]) and slot not in self.stale) else 0

    def _shift(self, slot: int, prompt: list[int], at: int) -> int:
        """Context shift: where the prompt goes on (from `at`, its shared prefix with the slot) with a
        later stretch of the slot's tokens (a chat whose oldest turns were dropped: the system prompt,
        then the newest turns), move that stretch's keys and values down to `at`. -> tokens moved."""
        ids = self.ids[slot]
        if self.shift is None or at >= len(ids):
            return 0
        best_from, best = 0, 0
        candidates = [b for b in range(at + 1, len(ids)) if ids[b] == prompt[at]][:MAX_SHIFT_CANDIDATES]
        for b in candidates:
            n = min(shared_prefix(ids[b:], prompt[at:]), len(prompt) - 1 - at)
            if n > best:
                best_from, best = b, n
        if best < MIN_SHIFT_TOKENS:
            return 0
        self.shift(slot, best_from, at, best)
        self.ids[slot] = ids[:at] + ids[best_from:best_from + best]
        return best

    def check(self, slot: int, lease: int) -> None:
        if self.lease[slot] != lease:
            raise OffloadMoeError("this generation was abandoned and its KV cache given to another one "
                                  "(finish or close a generation before starting the next)")

    def wrote(self, slot: int, lease: int, ids: list[int]) -> None:
        """Keys and values of `ids` were written at the slot's next positions."""
        if self.lease[slot] == lease:
            self.ids[slot] += ids

    def release(self, slot: int, lease: int) -> None:
        """The sequence finished: the slot is free, its cache stays for the next prompt."""
        if self.lease[slot] == lease:
            self.lease[slot] = 0

    def clear(self) -> None:
        """Forget every slot's contents and every kept sequence (after the caches were reallocated)."""
        self.__init__(self.caches, self.keep_bytes, self.shift, self.recurrent)

    # -- kept sequences
    def _keep(self, slot: int, reused: int) -> None:
        """Copy the slot's cache out before positions from `reused` on are overwritten (if they hold more)."""
        ids = self.ids[slot]
        if len(ids) <= reused or not ids or self.recurrent:
            return
        key = tuple(ids)
        size = len(ids) * self.position_bytes
        if size > self.keep_bytes:
            return
        if key not in self.kept:
            n = len(ids)
            self.kept[key] = [(c.k[slot, :, :n].to("cpu", copy=True), c.v[slot, :, :n].to("cpu", copy=True))
                              for c in self.caches]                   # L x ((nkv, n, hd), (nkv, n, hd))
            self.kept_bytes += size
        self.kept.move_to_end(key)
        while self.kept_bytes > self.keep_bytes:
            old, _ = self.kept.popitem(last=False)
            self.kept_bytes -= len(old) * self.position_bytes

    def _restore(self, slot: int, key: tuple[int, ...]) -> None:
        tensors = self.kept.pop(key)
        self.kept_bytes -= len(key) * self.position_bytes
        n = len(key)
        for c, (k, v) in zip(self.caches, tensors):
            c.k[slot, :, :n].copy_(k)
            c.v[slot, :, :n].copy_(v)
        self.ids[slot] = list(key)

    def stats(self) -> dict:
        return {"slots": self.count, "kept_sequences": len(self.kept), "kept_bytes": self.kept_bytes,
                "keep_bytes": self.keep_bytes}
