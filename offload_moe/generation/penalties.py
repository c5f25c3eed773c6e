"""Logit penalties and the record of log-probabilities, beside the sampler in `generate.py`.

Definitions followed (each tested against its reference on fixed logits):
- repetition_penalty (transformers' `RepetitionPenaltyLogitsProcessor`, from the CTRL paper): every
  token already in the sequence (prompt and generated) has its logit divided by the penalty when
  positive, multiplied by it when negative. 1.0 is off.
- presence_penalty / frequency_penalty (OpenAI's definition): `logit[j] -= c[j] * frequency +
  (c[j] > 0) * presence`, where c[j] counts the times token j was generated so far (the prompt does
  not count, as in OpenAI's API and vLLM). 0.0 is off.

`TokenCounts` keeps the counts on the compute device, allocated once per generation, and is updated
with a device-side index write: no host sync and no allocation per token.
"""

from __future__ import annotations

import torch


class TokenCounts:
    """seen (V,) bool: in the prompt or generated; generated (V,) fp32: how often each id was generated."""

    def __init__(self, vocab_size: int, prompt: list[int], device: torch.device):
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.seen[torch.tensor(prompt, device=device)] = True
        self.generated = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self._true = torch.ones((), dtype=torch.bool, device=device)

    def add(self, token: torch.Tensor) -> None:
        """token: 0-d id tensor on the device (not read on the host)."""
        index = (token.view(1),)
        self.generated.index_put_(index, self._one.view(1), accumulate=True)
        self.seen.index_put_(index, self._true.view(1))


def penalize(logits: torch.Tensor, counts: TokenCounts, repetition_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> torch.Tensor:
    """logits (V,) fp32 -> penalized logits (V,) (a new tensor; the input is not modified)."""
    if repetition_penalty != 1.0:
        scaled = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(counts.seen, scaled, logits)
    if frequency_penalty != 0.0:
        logits = logits - frequency_penalty * counts.generated
    if presence_penalty != 0.0:
        logits = logits - presence_penalty * (counts.generated > 0).to(logits.dtype)
    big = torch.finfo(logits.dtype).max  # a tiny repetition_penalty (1e-40) divides a logit past it
    return logits.clamp(-big, big)


class LogprobRecord:
    """Log-probabilities of each generated token and of the `top` most likely ones, from the logits the
    sampler used (after penalties, before temperature and the top-k / top-p / min-p cuts). Costs one
    small device->host copy per token, so it is made only when asked for."""

    def __init__(self, top: int = 0):
        self.top = top
        self.entries: list[dict] = []   # {"token": id, "logprob": float, "top": [(id, logprob), ...]}

    def add(self, logits: torch.Tensor, token: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)                    # (V,)
        chosen = logprobs[token]
        if self.top > 0:
            values, ids = torch.topk(logprobs, min(self.top, logprobs.shape[-1]))
            top = list(zip(ids.tolist(), values.tolist()))
        else:
            top = []
        self.entries.append({"token": int(token), "logprob": float(chosen), "top": top})
