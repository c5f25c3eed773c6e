"""Continuous batching: up to N sequences decoding together, each in its own KV cache slot.

Each `step` prefills one chunk of the oldest sequence still reading its prompt (so a long prompt
never stalls the running streams for longer than one chunk), then advances every sequence that has
a token to feed by one batched decode step (`Transformer.decode_rows`: projections, routers and
experts on all rows at once, so each expert's weights are read once for every row routed to it;
attention row by row). One sequence alone takes the solo path (`Transformer.forward` with its
slot): the one-token C fast paths, as fast as `generate.decode_tokens`. Each sequence keeps its own
sampling, penalties, log-probabilities and random state (`generate.TokenChooser`); its prompt
starts from the longest prefix its slot or a kept sequence holds (`kv_slots.KVSlots`).

Results equal solo runs up to floating-point rounding: a batched product sums in another order than
a one-row one (greedy tokens are the same unless two logits tie within rounding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..base.errors import OffloadMoeError
from .generate import NO_STEERING, DecodeTiming, Sampling, Steering, TokenChooser
from ..model.transformer import Transformer

DEFAULT_PREFILL_CHUNK = 128   # prompt tokens per step while other sequences decode


@dataclass(eq=False)
class BatchSequence:
    """One sequence in the batch. `error`: the one-line reason it failed (its tokens stop there)."""
    prompt: list[int]
    max_new_tokens: int
    chooser: TokenChooser
    slot: int
    lease: int
    pos: int                         # the next position to write in its slot
    token: torch.Tensor | None = None   # the last chosen token, still to be fed (0-d, on the device)
    finished: bool = False           # no more tokens: max_new_tokens reached or the context full
    error: str | None = None
    owner: object = field(default=None, repr=False)   # whatever the caller attached (its request)

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)


class DecodeBatch:
    """The sequences decoding together on `model` (at most `model.kv_slots.count`)."""

    def __init__(self, model: Transformer, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.model, self.prefill_chunk = model, prefill_chunk
        self.sequences: list[BatchSequence] = []     # in arrival order

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def full(self) -> bool:
        return len(self.sequences) >= self.model.kv_slots.count

    def add(self, prompt: list[int], max_new_tokens: int, sampling: Sampling, timing: DecodeTiming,
            steer: Steering = NO_STEERING, owner=None) -> BatchSequence:
        """Claim a free slot for `prompt` (the batch must not be full); nothing runs until `step`."""
        if self.full:
            raise RuntimeError("the batch is full")
        slots = self.model.kv_slots
        slot, lease, reused = slots.claim(prompt)
        timing.prompt_tokens, timing.reused_tokens, timing.prefill_tokens = len(prompt), reused, len(prompt) - reused
        chooser = TokenChooser(self.model, prompt, sampling, timing, steer)
        seq = BatchSequence(prompt, max_new_tokens, chooser, slot, lease, reused, owner=owner)
        self.sequences.append(seq)
        return seq

    def remove(self, seq: BatchSequence) -> None:
        """The sequence is done (or its request went away): its slot is free, its cache kept."""
        if seq in self.sequences:
            self.sequences.remove(seq)
            self.model.kv_slots.release(seq.slot, seq.lease)

    def step(self) -> list[tuple[BatchSequence, int | None]]:
        """One prefill chunk and one decode step -> (sequence, token id) for each token chosen
        (None for a sequence that failed: its `error` says why). Finished sequences stay until removed."""
        out = []
        prefilling = next((s for s in self.sequences if s.prefilling and s.error is None), None)
        if prefilling is not None:
            self._prefill(prefilling, out)
        ready = [s for s in self.sequences
                 if s.token is not None and not s.finished and s.error is None and s is not prefilling]
        if len(ready) == 1:
            s = ready[0]
            logits = self.model(s.token.view(1, 1), start=s.pos, last_only=True, slot=s.slot)[:, -1]  # (1, V)
        elif ready:
            tokens = torch.stack([s.token for s in ready])                                        # (B,)
            logits = self.model.decode_rows(tokens, [s.slot for s in ready], [s.pos for s in ready])  # (B, V)
        for b, s in enumerate(ready):
            self.model.kv_slots.wrote(s.slot, s.lease, s.chooser.generated[-1:])
            s.pos += 1
            self._choose(s, logits[b], out)
        return out

    def _prefill(self, s: BatchSequence, out: list) -> None:
        if s.pos == len(s.prompt) - s.chooser.timing.prefill_tokens:   # its first chunk: the clock starts
            s.chooser.t0 = time.perf_counter()
        chunk = s.prompt[s.pos:s.pos + self.prefill_chunk]
        tokens = torch.tensor([chunk], device=self.model.device)
        logits = self.model(tokens, start=s.pos, last_only=True, slot=s.slot)[0, -1]            # (V,)
        self.model.kv_slots.wrote(s.slot, s.lease, chunk)
        s.pos += len(chunk)
        if not s.prefilling:
            self._choose(s, logits, out)

    def _choose(self, s: BatchSequence, logits: torch.Tensor, out: list) -> None:
        try:
            s.token, token_id = s.chooser.choose(logits)
        except OffloadMoeError as e:
            s.error, s.token = str(e), None
            out.append((s, None))
            return
        s.finished = len(s.chooser.generated) >= s.max_new_tokens or s.pos >= self.model.max_seq_len
        out.append((s, token_id))
