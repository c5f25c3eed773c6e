"""Sampling and the decode loop: small pure functions, one generator, streaming for free.

`decode_tokens` prefills the prompt in one pass, then yields one token id per step. Reading the
token (to check for end-of-sequence and to stream it) is the only host sync per token besides the
MoE layers' routing decisions; a finiteness flag of the logits rides along in the same transfer,
and only when it is down is the sequence re-run to name the layer that produced NaN or Inf.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import OffloadMoeError
from .model import Transformer
from .penalties import LogprobRecord, TokenCounts, penalize
from .nonfinite import diagnose


@dataclass(frozen=True)
class Sampling:
    """How a token is drawn. These defaults are the library's, the CLI's and the server's."""
    temperature: float = 0.7   # 0 means greedy
    top_p: float = 0.95
    top_k: int = 0             # 0 means no top-k cut
    seed: int | None = None
    min_p: float = 0.0         # drop tokens less likely than min_p x the top token's probability
    repetition_penalty: float = 1.0   # penalties: see penalties.py (1.0 / 0.0 are off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


DEFAULT_SAMPLING = Sampling()


def logits_to_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits (V,) fp32 -> probabilities after temperature, top-k, top-p (nucleus) and min-p cuts
    (in transformers' order; min-p keeps tokens with p >= min_p * max p)."""
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= s.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    if s.min_p > 0.0:
        probs = probs.masked_fill(probs < s.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (V,) -> a 0-d token id tensor on the same device (no host sync)."""
    if s.temperature == 0:
        return torch.argmax(logits)
    probs = logits_to_probs(logits, s)
    return torch.multinomial(probs, 1, generator=generator)[0]


@dataclass
class DecodeTiming:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.new_tokens - 1, 0)  # the first token comes out of prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


def decode_tokens(model: Transformer, prompt: list[int], max_new_tokens: int, sampling: Sampling,
                  timing: DecodeTiming | None = None, *, generator: torch.Generator | None = None,
                  logprobs: LogprobRecord | None = None, bias: torch.Tensor | None = None,
                  constraint=None) -> Iterator[int]:
    """Yield up to max_new_tokens ids; the caller stops early on EOS or a stop string.

    generator: the random state to draw from (a chat session passes one for the whole session);
    without one, `sampling.seed` seeds a fresh one. logprobs: filled in step by step when given.
    bias (V,) on the device: added to the logits before penalties and sampling (OpenAI's logit_bias).
    constraint: a `constrain.Constraint`; it masks the logits last, just before sampling, and
    advances by each token read."""
    timing = timing if timing is not None else DecodeTiming()
    device = model.device
    if generator is None and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    timing.prompt_tokens = len(prompt)
    t0 = time.perf_counter()
    tokens = torch.tensor([prompt], device=device)
    logits = model(tokens, start=0, last_only=True)[0, -1]                 # (V,)
    pos = len(prompt)
    counts = TokenCounts(logits.shape[-1], prompt, device) if sampling.penalized else None
    generated: list[int] = []
    for i in range(max_new_tokens):
        finite = torch.isfinite(logits.sum())                              # () one reduction, no sync
        if sampling.temperature > 0:
            logits = logits.nan_to_num_(0.0, 0.0, 0.0)                      # multinomial must not see NaN
        if bias is not None:
            logits = logits.add_(bias)
        if counts is not None:
            logits = penalize(logits, counts, sampling.repetition_penalty, sampling.presence_penalty,
                              sampling.frequency_penalty)
        if constraint is not None:
            logits = constraint.apply(logits)                               # forbidden ids -> -inf
        token = sample(logits, sampling, generator)
        if counts is not None:
            counts.add(token)
        if logprobs is not None:
            logprobs.add(logits, token)
        token_id, ok = torch.stack((token, finite.to(token.dtype))).tolist()  # the token must be read
        if not ok:
            raise OffloadMoeError(diagnose(model, prompt + generated, i))
        if constraint is not None:
            constraint.advance(token_id)
        generated.append(token_id)
        now = time.perf_counter()
        if i == 0:
            timing.prefill_seconds = now - t0
            t_decode = now
        else:
            timing.decode_seconds = now - t_decode
        timing.new_tokens = i + 1
        yield token_id
        if i + 1 == max_new_tokens or pos >= model.max_seq_len:
            return
        logits = model(token.view(1, 1), start=pos, last_only=True)[0, -1]
        pos += 1
