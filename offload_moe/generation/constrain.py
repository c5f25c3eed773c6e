"""Constrained decoding: a grammar (JSON schema, regex or Lark) masks the tokens the model may sample,
through llguidance (picked over xgrammar by measured per-token cost: BENCHMARKS.md, issue 26).

Per token: llguidance computes which tokens keep the output inside the grammar into a preallocated
bitmask (V/32 int32 words, on the host), the bitmask goes to the sampling device, is unpacked there
and forbids every other token (-inf) just before sampling; once the token is read (the host sync the
loop makes anyway), the grammar advances by it. When the grammar is complete only end-of-sequence is
allowed, so the generation ends with a finished document.

`GrammarTokenizer` wraps the model's tokenizer once (slow for a 150k vocabulary) and is cached on the
model; a `Constraint` is one generation's grammar state.
"""

from __future__ import annotations

import json

import torch

from ..base.errors import OffloadMoeError

INSTALL_HINT = "pip install llguidance (a dependency of offload-moe: reinstall it)"
# Compact JSON: no free whitespace between tokens (a model could otherwise emit spaces forever).
JSON_OPTIONS = {"whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise OffloadMoeError(f"constrained decoding needs the llguidance package, which is not installed: "
                              f"{INSTALL_HINT}") from None
    return llguidance


def grammar_from(json_schema=None, regex: str | None = None, grammar: str | None = None) -> str:
    """One of: a JSON schema (a dict, a JSON string, or True for any JSON object), a regex, or a Lark
    grammar (llguidance's dialect) -> llguidance's grammar text, checked (one-line error when not valid)."""
    given = [name for name, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
             if v is not None]
    if len(given) > 1:
        raise OffloadMoeError(f"{' and '.join(given)}: give one constraint, not several")
    llg = _llguidance()
    if json_schema is not None:
        if json_schema is True:
            json_schema = {"type": "object"}
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except ValueError as e:
                raise OffloadMoeError(f"json_schema: not valid JSON ({e})") from None
        if not isinstance(json_schema, dict):
            raise OffloadMoeError(f"json_schema: expected a JSON Schema object, got {type(json_schema).__name__}")
        text, what = llg.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_OPTIONS), "json_schema"
    elif regex is not None:
        if not isinstance(regex, str) or not regex:
            raise OffloadMoeError(f"regex = {regex!r}, expected a non-empty string")
        text, what = llg.LLMatcher.grammar_from_regex(regex), "regex"
    elif grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise OffloadMoeError(f"grammar = {grammar!r}, expected a non-empty Lark grammar")
        text, what = llg.LLMatcher.grammar_from_lark(grammar), "grammar"
    else:
        raise OffloadMoeError("no constraint given (expected json_schema, regex or grammar)")
    error = llg.LLMatcher.validate_grammar(text)
    if error and not error.startswith("WARNING"):
        raise OffloadMoeError(f"{what}: {_one_line(error)}")
    return text


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:300] + "..."


class GrammarTokenizer:
    """The model's tokenizer as llguidance sees it: every token's bytes, over the model's vocab_size
    (ids past the tokenizer's own are never allowed), with the model's end-of-sequence ids."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        llg = _llguidance()
        backend = tokenizer.backend
        eos = sorted(i for i in eos_ids if i < vocab_size)
        try:
            self.llg = llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos or None)
        except Exception as e:  # llguidance raises a bare error for a tokenizer it cannot read
            raise OffloadMoeError(f"{tokenizer.source}: the tokenizer cannot be used for constrained "
                                  f"decoding ({_one_line(str(e))})") from None
        self.vocab_size = vocab_size


class Constraint:
    """One generation's grammar state: `apply(logits)` before sampling, `advance(token_id)` after."""

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str, device: torch.device):
        llg = _llguidance()
        self.matcher = llg.LLMatcher(tokenizer.llg, grammar, log_level=0)
        if self.matcher.is_error():
            raise OffloadMoeError(f"grammar: {_one_line(self.matcher.get_error())}")
        self.vocab_size = tokenizer.vocab_size
        words = (self.vocab_size + 31) // 32
        pinned = device.type == "cuda" and torch.cuda.is_available()
        # Allocated once; per token: llguidance fills host_mask, one copy to the device, two ops unpack it.
        self.host_mask = torch.zeros(words, dtype=torch.int32, pin_memory=pinned)   # (W,) bits of allowed ids
        self.mask = torch.zeros(words, dtype=torch.int32, device=device)            # (W,) on the device
        self.bits = (1 << torch.arange(32, dtype=torch.int64, device=device)).to(torch.int32)  # (32,)
        self.words = torch.zeros((words, 32), dtype=torch.int32, device=device)     # (W, 32) mask & bit
        self.forbidden = torch.zeros(words * 32, dtype=torch.bool, device=device)   # (W*32,) id not allowed

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) on the sampling device: every token the grammar forbids set to -inf, in place.
        (The host mask is rewritten only after the token of the previous step was read, a sync, so
        the asynchronous copy from it has finished.)"""
        self.matcher.unsafe_compute_mask_ptr(self.host_mask.data_ptr(), self.host_mask.numel() * 4)
        if self.matcher.is_error():
            raise OffloadMoeError(f"grammar: {_one_line(self.matcher.get_error())}")
        self.mask.copy_(self.host_mask, non_blocking=True)
        torch.bitwise_and(self.mask[:, None], self.bits, out=self.words)           # (W, 32)
        torch.eq(self.words.view(-1), 0, out=self.forbidden)                         # (W*32,)
        return logits.masked_fill_(self.forbidden[:logits.shape[-1]], float("-inf"))

    def advance(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise OffloadMoeError(f"grammar: token {token_id} was sampled but the grammar does not allow it "
                                  f"({_one_line(self.matcher.get_error())})")

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()
