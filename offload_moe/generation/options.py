"""What one generation is asked for, as one frozen value: `Model.generate(prompt, GenerationOptions(...))`,
or the same fields as keyword arguments (`model.generate(prompt, max_new_tokens=40, temperature=0)`),
which build one (`GenerationOptions.of`): an unknown name is a TypeError naming it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float | None = None      # None: the checkpoint's generation_config.json, else 0.7; 0 is greedy
    top_p: float | None = None            # None: the checkpoint's, else 0.95
    top_k: int | None = None              # None: the checkpoint's, else 0 (off)
    min_p: float = 0.0
    repetition_penalty: float = 1.0       # transformers' definition
    presence_penalty: float = 0.0         # OpenAI's
    frequency_penalty: float = 0.0        # OpenAI's
    seed: int | None = None
    stop: str | list[str] | None = None   # stop strings (not included in the text)
    ignore_eos: bool = False              # benchmarks and parity tests want a fixed number of tokens
    should_stop: Callable[[], bool] | None = None  # checked between tokens: a server cancels a departed client
    logprobs: int | None = None           # N: each token's log-probability and the N most likely
    generator: torch.Generator | None = None  # draw from it instead of seeding one
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # {token id: bias from -100 to 100}, as OpenAI's
    json_schema: object = None            # a JSON Schema dict or string, or True for any JSON object
    regex: str | None = None
    grammar: str | None = None            # a Lark grammar in llguidance's dialect

    @classmethod
    def of(cls, options: GenerationOptions | None = None, **given) -> GenerationOptions:
        """`options` (default: all defaults) with the given fields replaced."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options = {options!r}, expected a GenerationOptions")
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unexpected generation option {unknown[0]!r}")
        return replace(options or cls(), **given) if given else (options or cls())


if TYPE_CHECKING:
    from typing import TypedDict

    class GenerationFields(TypedDict, total=False):
        """`GenerationOptions`' fields as keyword arguments (`Model.generate(prompt, **fields)`)."""
        max_new_tokens: int
        temperature: float | None
        top_p: float | None
        top_k: int | None
        min_p: float
        repetition_penalty: float
        presence_penalty: float
        frequency_penalty: float
        seed: int | None
        stop: str | list[str] | None
        ignore_eos: bool
        should_stop: Callable[[], bool] | None
        logprobs: int | None
        generator: torch.Generator | None
        skip_special_tokens: bool
        logit_bias: dict[int, float] | None
        json_schema: object
        regex: str | None
        grammar: str | None
