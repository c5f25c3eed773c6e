"""Sampling and the decode loop: small pure functions, one generator, streaming for free.

`decode_tokens` prefills the prompt in one pass, then yields one token id per step. Reading the
token (to check for end-of-sequence and to stream it) is the only host sync per token besides the
MoE layers' routing decisions; a finiteness flag of the logits rides along in the same transfer,
and only when it is down is the sequence re-run to name the layer that produced NaN or Inf.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..base.errors import OffloadMoeError
from ..model.transformer import Transformer
from .penalties import LogprobRecord, TokenCounts, penalize
from .nonfinite import diagnose


GREEDY_BELOW = 1e-5  # a temperature below this samples as greedy (see Sampling)


@dataclass(frozen=True)
class Sampling:
    """How a token is drawn. These defaults are the library's, the CLI's and the server's.

    A temperature below `GREEDY_BELOW` (1e-5) is greedy, as 0 is: at such a temperature a logit gap
    of 0.001 already leaves the lower token less than e^-100 of the mass, and tinier ones (1e-300)
    are 0 in float32, where dividing by them would give inf and NaN. Every value the sampler is
    given stays finite in float32: logits are shifted so their maximum is 0 before the temperature
    divides them, penalties saturate at float32's largest value, and the top-p cut always keeps the
    most likely token (a top_p of 1e-45 is 0 where a GPU flushes denormals)."""
    temperature: float = 0.7   # 0 (or below GREEDY_BELOW) means greedy
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
RANDOM_SEED = -1  # llama.cpp's convention: seed -1 asks for a random seed (torch would take it as a fixed one)


def draw_seed(seed: int | None) -> int | None:
    """`seed` as given, except RANDOM_SEED: a fresh random one (so its run can still be repeated)."""
    return secrets.randbelow(2**32) if seed == RANDOM_SEED else seed


def logits_to_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits (V,) fp32 -> probabilities after temperature, top-k, top-p (nucleus) and min-p cuts
    (in transformers' order; min-p keeps tokens with p >= min_p * max p)."""
    logits = (logits - logits.max()) / s.temperature                       # (V,) <= 0: no overflow
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= s.top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    if s.min_p > 0.0:
        probs = probs.masked_fill(probs < s.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (V,) -> a 0-d token id tensor on the same device (no host sync)."""
    if s.temperature < GREEDY_BELOW:
        return torch.argmax(logits)
    probs = logits_to_probs(logits, s)
    return torch.multinomial(probs, 1, generator=generator)[0]


@dataclass
class DecodeTiming:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0       # prompt tokens computed; the others' keys and values were reused
    reused_tokens: int = 0        # prompt tokens whose keys and values came from an earlier sequence
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.new_tokens - 1, 0)  # the first token comes out of prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


@dataclass(frozen=True)
class Steering:
    """What steers each token's choice besides the sampling settings (nothing, by default).

    generator: the random state to draw from (a chat session passes one for the whole session);
    without one, `sampling.seed` seeds a fresh one. logprobs: filled in step by step when given.
    bias (V,) on the device: added to the logits before penalties and sampling (OpenAI's logit_bias).
    constraint: a `constrain.Constraint`; it masks the logits last, just before sampling."""
    generator: torch.Generator | None = None
    logprobs: LogprobRecord | None = None
    bias: torch.Tensor | None = None
    constraint: object = None


NO_STEERING = Steering()


class TokenChooser:
    """One sequence's side of each step: from its logits (V,) to the next token id, with its own
    sampling settings, penalties, log-probabilities, random generator and timing. The solo loop
    (`decode_tokens`) and the batched one (`batch.DecodeBatch`) share it."""

    def __init__(self, model: Transformer, prompt: list[int], sampling: Sampling, timing: DecodeTiming,
                 steer: Steering = NO_STEERING):
        self.model, self.prompt, self.sampling, self.timing = model, prompt, sampling, timing
        self.bias, self.constraint = steer.bias, steer.constraint
        generator, logprobs = steer.generator, steer.logprobs
        if generator is None and sampling.seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
        self.generator, self.logprobs = generator, logprobs
        self.counts = None
        self.generated: list[int] = []
        self.t0 = self.t_decode = time.perf_counter()

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """logits (V,) fp32 -> (the token as a 0-d tensor on the device, its id), recorded."""
        s, i = self.sampling, len(self.generated)
        if s.penalized and self.counts is None:
            self.counts = TokenCounts(logits.shape[-1], self.prompt, logits.device)
        finite = torch.isfinite(logits.sum())                              # () one reduction, no sync
        if s.temperature > 0:
            logits = logits.nan_to_num_(0.0, 0.0, 0.0)                      # multinomial must not see NaN
        if self.bias is not None:
            logits = logits.add_(self.bias)
        if self.counts is not None:
            logits = penalize(logits, self.counts, s.repetition_penalty, s.presence_penalty, s.frequency_penalty)
        if self.constraint is not None:
            logits = self.constraint.apply(logits)                          # forbidden ids -> -inf
        token = sample(logits, s, self.generator)
        if self.counts is not None:
            self.counts.add(token)
        if self.logprobs is not None:
            self.logprobs.add(logits, token)
        token_id, ok = torch.stack((token, finite.to(token.dtype))).tolist()  # the token must be read
        if not ok:
            raise OffloadMoeError(diagnose(self.model, self.prompt + self.generated, i))
        if self.constraint is not None:
            self.constraint.advance(token_id)
        self.generated.append(token_id)
        now, timing = time.perf_counter(), self.timing
        if i == 0:
            timing.prefill_seconds = now - self.t0
            self.t_decode = now
        else:
            timing.decode_seconds = now - self.t_decode
        timing.new_tokens = i + 1
        return token, token_id


def decode_tokens(model: Transformer, prompt: list[int], max_new_tokens: int, sampling: Sampling,
                  timing: DecodeTiming | None = None, *, steer: Steering = NO_STEERING,
                  reuse: bool = True) -> Iterator[int]:
    """Yield up to max_new_tokens ids; the caller stops early on EOS or a stop string.

    steer: the random generator, log-probability record, logit bias and grammar constraint
    (`Steering`; the constraint advances by each token read).
    reuse: start from the keys and values of the longest prefix of `prompt` the KV cache still
    holds (`kv_slots.KVSlots`), prefilling only the rest; False prefills all of it (benchmarks)."""
    timing = timing if timing is not None else DecodeTiming()
    slots = model.kv_slots
    slot, lease, pos = slots.claim(prompt, reuse)
    try:
        timing.prompt_tokens, timing.reused_tokens, timing.prefill_tokens = len(prompt), pos, len(prompt) - pos
        chooser = TokenChooser(model, prompt, sampling, timing, steer)
        tokens = torch.tensor([prompt[pos:]], device=model.device)
        logits = model(tokens, start=pos, last_only=True, slot=slot)[0, -1]      # (V,)
        slots.wrote(slot, lease, prompt[pos:])
        pos = len(prompt)
        for i in range(max_new_tokens):
            token, token_id = chooser.choose(logits)
            yield token_id
            if i + 1 == max_new_tokens or pos >= model.max_seq_len:
                return
            slots.check(slot, lease)
            logits = model(token.view(1, 1), start=pos, last_only=True, slot=slot)[0, -1]
            slots.wrote(slot, lease, chooser.generated[-1:])
            pos += 1
    finally:
        slots.release(slot, lease)
