"""The Python API: `load()` a checkpoint, then `generate`, `stream`, `chat` or score with `logits`.

`load` opens the checkpoint lazily, reads the dense weights onto the compute device, and hands the
experts to an expert provider (all resident, or the offloading engine); the model sees experts only
through that provider. Generation turns text into ids, runs the decode loop, and turns ids back into
text with stop handling. Nothing here prints: progress goes through the `progress` callback.
"""

from __future__ import annotations

import math

from collections.abc import Iterator
from typing import TYPE_CHECKING
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..generation.constrain import Constraint, GrammarTokenizer, grammar_from
from ..base.errors import OffloadMoeError
from ..generation.generate import DecodeTiming, Sampling, Steering, decode_tokens, draw_seed
from ..generation.defaults import GenerationDefaults
from ..generation.options import GenerationOptions
from ..model.transformer import Transformer
from .settings import ModelSettings
from ..generation.penalties import LogprobRecord
from ..generation.text import StreamDecoder, Tokenizer
from ..base.validate import check_sampling

if TYPE_CHECKING:  # keyword arguments typed by the options value's fields (PEP 692)
    from typing_extensions import Unpack

    from ..generation.options import GenerationFields

@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" (EOS or a stop string), "length", or "cancelled" (should_stop)
    stats: dict = field(default_factory=dict)
    logprobs: list[dict] | None = None   # with logprobs=N: one entry per token id (see penalties.LogprobRecord)

    @property
    def context_full(self) -> bool:
        """True when the generation stopped because the context was full (not at max_new_tokens)."""
        g = self.stats.get("generation", {})
        return self.finish_reason == "length" and g.get("context_full", False)


class Model:
    """A loaded model: the transformer on its device, its experts provider, its tokenizer."""

    def __init__(self, transformer: Transformer, experts, tokenizer: Tokenizer | None, path: Path,
                 settings: ModelSettings, placement=None, generation: GenerationDefaults | None = None):
        """The device and dtype are the transformer's (`Transformer.setup`)."""
        self.transformer = transformer
        self.generation = generation or GenerationDefaults()  # generation_config.json: stop ids, sampling
        self.experts = experts
        self.tokenizer = tokenizer
        self.config = transformer.config
        self.path, self.device, self.dtype = path, transformer.device, transformer.dtype
        self.settings = settings    # what load() resolved (`ModelSettings`; `.as_dict()` for JSON)
        self.placement = placement  # the `options.Placement` load() used (None when built by hand)
        self.last_timing = DecodeTiming()
        ids = set(self.config.eos_token_ids) | set(self.generation.eos_token_ids)
        if tokenizer is not None and tokenizer.token_id(tokenizer.eos_token) is not None:
            ids.add(tokenizer.token_id(tokenizer.eos_token))
        self.eos_ids = frozenset(ids)
        self._grammar_tokenizer: GrammarTokenizer | None = None

    @property
    def context_length(self) -> int:
        return self.transformer.max_seq_len

    @property
    def stats(self) -> dict:
        """Expert engine counters (hits, misses, bytes moved...), the process's memory by kind and the
        last generation's timing."""
        return self.stats_of(self.last_timing)

    def stats_of(self, t: DecodeTiming) -> dict:
        """`stats` with the timing of a given generation (each of a server's concurrent ones has its own)."""
        return {"experts": self.experts.stats(), "memory": process_memory(),
                "generation": {"prompt_tokens": t.prompt_tokens, "new_tokens": t.new_tokens,
                               "prefill_tokens": t.prefill_tokens, "reused_tokens": t.reused_tokens,
                               "prefill_seconds": t.prefill_seconds, "decode_seconds": t.decode_seconds,
                               "prefill_tokens_per_second": t.prefill_tokens_per_second,
                               "decode_tokens_per_second": t.decode_tokens_per_second}}

    # ---- scoring ----
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids LongTensor (B, T) -> fp32 logits (B, T, V). Stateless: the KV cache is untouched."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise OffloadMoeError(f"input_ids: expected a (batch, tokens) tensor, got shape {list(input_ids.shape)}")
        self._check_ids(input_ids.flatten().tolist())
        if input_ids.shape[1] > self.context_length:
            raise OffloadMoeError(f"input_ids: {input_ids.shape[1]} tokens exceed the context length "
                                  f"{self.context_length}")
        return self.transformer(input_ids.to(self.device), start=0, use_cache=False).cpu()

    # ---- generation ----
    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The tokenizer as the constrained decoder sees it, built on first use (about a second for a
        150k vocabulary) and kept."""
        if self._grammar_tokenizer is None:
            if self.tokenizer is None:
                raise OffloadMoeError(f"{self.path}: no tokenizer.json, so constrained decoding is not available")
            self._grammar_tokenizer = GrammarTokenizer(self.tokenizer, self.config.vocab_size, self.eos_ids)
        return self._grammar_tokenizer

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise OffloadMoeError("prompt is empty (expected some text)")
            if self.tokenizer is None:
                raise OffloadMoeError(f"{self.path}: no tokenizer.json, so prompts must be token ids")
            return self._check_encoded(self.tokenizer.encode(prompt))
        ids = list(prompt)
        if not ids:
            raise OffloadMoeError("prompt is empty (expected at least one token id)")
        self._check_ids(ids)
        return ids

    def _check_encoded(self, ids: list[int]) -> list[int]:
        """Ids the tokenizer produced must index the model's embeddings (a mismatched tokenizer.json)."""
        top = max(ids, default=0)
        if top >= self.config.vocab_size:
            raise OffloadMoeError(f"{self.path / 'tokenizer.json'}: produced token id {top}, outside the model's "
                                  f"vocabulary of {self.config.vocab_size} (config.json vocab_size): "
                                  "the tokenizer does not belong to this model")
        return ids

    def _check_ids(self, ids: list[int]):
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.config.vocab_size]
        if bad:
            raise OffloadMoeError(f"token id {bad[0]!r} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    def start(self, prompt: str | list[int], options: GenerationOptions | None = None,
              **given: Unpack[GenerationFields]) -> GenerationRun:
        """A generation, checked but not yet run (the options of `generate`): iterate it for
        text pieces; its `.result`, `.token_ids` and `.logprobs` fill in as it goes."""
        return GenerationRun(self, prompt, options, **given)

    def stream(self, prompt: str | list[int], options: GenerationOptions | None = None,
               **given: Unpack[GenerationFields]) -> Iterator[str]:
        """Yield the generated text piece by piece (each piece valid UTF-8)."""
        run = self.start(prompt, options, **given)
        yield from run
        self.last_result = run.result

    def generate(self, prompt: str | list[int], options: GenerationOptions | None = None,
                 **given: Unpack[GenerationFields]) -> Generation:
        """Generate a completion, as `options` (a `GenerationOptions`) with the fields given as keywords
        replaced (`model.generate(prompt, max_new_tokens=40, temperature=0)`). The fields:
        max_new_tokens=256, temperature, top_p, top_k
        (default: the checkpoint's generation_config.json, else 0.7, 0.95, 0), min_p=0.0,
        repetition_penalty=1.0 (transformers' definition), presence_penalty=0.0,
        frequency_penalty=0.0 (OpenAI's), seed=None (-1: a random one, as llama.cpp's), stop=None (a string or list of strings),
        ignore_eos=False, should_stop=None (a callable checked between tokens), logprobs=None (N:
        record each token's log-probability and the N most likely), generator=None (a
        torch.Generator to draw from instead of seeding one), skip_special_tokens=True,
        logit_bias=None ({token id: bias from -100 to 100} added to the logits, as OpenAI's),
        json_schema=None (a JSON Schema dict or string, or True for any JSON object), regex=None,
        grammar=None (a Lark grammar in llguidance's dialect): the output is constrained to match
        (one of the three; through llguidance). temperature=0 is greedy."""
        run = GenerationRun(self, prompt, options, **given)
        for _ in run:
            pass
        return run.result

    def chat(self, messages: list[dict], **kwargs) -> Generation:
        """Reply to a conversation rendered through the checkpoint's chat template."""
        return self.generate(self.chat_ids(messages), **kwargs)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None, **template_vars) -> list[int]:
        """Prompt ids of a conversation, as transformers' apply_chat_template(messages, tools=tools,
        **template_vars) (e.g. reasoning_effort="high" for gpt-oss's template)."""
        return self.encode_chat(self.chat_text(messages, tools, **template_vars))

    def chat_text(self, messages: list[dict], tools: list[dict] | None = None, **template_vars) -> str:
        """The conversation rendered through the chat template, ending with the assistant's turn opened."""
        if self.tokenizer is None:
            raise OffloadMoeError(f"{self.path}: no tokenizer.json, so chat is not available")
        return self.tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools,
                                          template_vars=template_vars)

    def encode_chat(self, text: str) -> list[int]:
        """Ids of a rendered conversation (the template wrote its special tokens itself)."""
        return self._check_encoded(self.tokenizer.encode(text, add_special_tokens=False))


class GenerationRun:
    """One generation: iterate for text pieces; `.result` holds the `Generation` when done."""

    def __init__(self, model: Model, prompt, options: GenerationOptions | None = None, **given):
        o = GenerationOptions.of(options, **given)
        max_new_tokens, stop, logprobs, min_p, seed = o.max_new_tokens, o.stop, o.logprobs, o.min_p, o.seed
        repetition_penalty, presence_penalty, frequency_penalty = (o.repetition_penalty, o.presence_penalty,
                                                                   o.frequency_penalty)
        logit_bias, json_schema, regex, grammar = o.logit_bias, o.json_schema, o.regex, o.grammar
        generator, should_stop, ignore_eos, skip_special_tokens = (o.generator, o.should_stop, o.ignore_eos,
                                                                   o.skip_special_tokens)
        temperature, top_p, top_k = model.generation.sampling(o.temperature, o.top_p, o.top_k)  # None: the model's
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed, stop)
        check_penalties(min_p, repetition_penalty, presence_penalty, frequency_penalty)
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= 20):
            raise OffloadMoeError(f"logprobs = {logprobs!r}, expected None or an integer from 0 to 20")
        self.model = model
        self.ids = model.encode_prompt(prompt)
        if len(self.ids) >= model.context_length:
            raise OffloadMoeError(f"prompt: {len(self.ids)} tokens leave no room in the context of "
                                  f"{model.context_length} tokens")
        self.max_new_tokens = max_new_tokens
        self.sampling = Sampling(temperature, top_p, top_k, draw_seed(seed), min_p, repetition_penalty, presence_penalty,
                                 frequency_penalty)
        self.generator = generator
        self.logprobs = LogprobRecord(logprobs) if logprobs is not None else None
        self.skip_special_tokens = skip_special_tokens
        self.ignore_eos = ignore_eos  # benchmarks and parity tests want a fixed number of tokens
        self.should_stop = should_stop  # checked between tokens: a server cancels a departed client
        self.stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.bias = _bias_vector(logit_bias, model) if logit_bias else None
        self.constraint = None
        if json_schema is not None or regex is not None or grammar is not None:
            text = grammar_from(json_schema=json_schema, regex=regex, grammar=grammar)
            self.constraint = Constraint(model.grammar_tokenizer(), text, model.device)
        self.result: Generation | None = None
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None   # set as the run ends
        self.timing = DecodeTiming()

    @property
    def steering(self) -> Steering:
        """This run's generator, log-probability record, logit bias and constraint, for the decode loop."""
        return Steering(self.generator, self.logprobs, self.bias, self.constraint)

    def __iter__(self) -> Iterator[str]:
        m = self.model
        m.last_timing = self.begin()
        tokens = decode_tokens(m.transformer, self.ids, self.max_new_tokens, self.sampling, self.timing,
                               steer=self.steering)
        try:
            for token_id in tokens:
                piece = self.push(token_id)
                if piece:
                    yield piece
                if self.finish_reason is not None:
                    break
        finally:
            tokens.close()
        tail = self.end()
        if tail:
            yield tail

    # The steps of `__iter__`, for a caller that produces the tokens itself (the server's batch):
    # `begin`, then `push` each token id until `finish_reason` is set or the tokens run out, then `end`.
    def begin(self) -> DecodeTiming:
        """Reset the run's state; returns the `DecodeTiming` its tokens' producer fills in."""
        m = self.model
        self.timing = DecodeTiming()
        self._decoder = StreamDecoder(m.tokenizer, self.skip_special_tokens) if m.tokenizer else None
        self.token_ids = []        # generated ids (EOS excluded), visible while iterating
        self._text, self._emitted = "", 0   # text so far; how much of it was handed out
        self.finish_reason: str | None = None
        return self.timing

    def push(self, token_id: int) -> str:
        """Take the next generated token; returns the text that became safe to show ("" if none).
        Sets `finish_reason` when the generation must stop here (EOS, a stop string, should_stop)."""
        if token_id in self.model.eos_ids and not self.ignore_eos:
            self.finish_reason = "stop"
            return ""
        self.token_ids.append(token_id)
        if self.should_stop is not None and self.should_stop():
            self.finish_reason = "cancelled"
            return ""
        if self._decoder is None:
            return ""
        self._text += self._decoder.push(token_id)
        cut = _find_stop(self._text, self.stops)
        if cut is not None:
            self._text, self.finish_reason = self._text[:cut], "stop"
            return ""
        safe = len(self._text) - _held_back(self._text, self.stops)
        if safe <= self._emitted:
            return ""
        piece, self._emitted = self._text[self._emitted:safe], safe
        return piece

    def end(self) -> str:
        """After the last token: the rest of the text (held back for stop strings); fills `result`."""
        m, text = self.model, self._text
        if self.finish_reason is None:   # the tokens ran out: max_new_tokens or the context
            self.finish_reason = "length"
            if self._decoder is not None:
                text += self._decoder.flush()
                cut = _find_stop(text, self.stops)
                text, self.finish_reason = (text[:cut], "stop") if cut is not None else (text, "length")
        tail = text[self._emitted:]
        self._text, self._emitted = text, len(text)
        stats = m.stats_of(self.timing)
        stats["generation"]["context_full"] = len(self.ids) + len(self.token_ids) >= m.context_length
        entries = self.logprobs.entries[:len(self.token_ids)] if self.logprobs is not None else None
        self.result = Generation(text, self.token_ids, self.finish_reason, stats, entries)
        return tail


def _bias_vector(logit_bias, model: Model) -> torch.Tensor:
    """{token id: bias} -> (V,) fp32 on the model's device, checked as OpenAI does (-100..100)."""
    if not isinstance(logit_bias, dict):
        raise OffloadMoeError(f"logit_bias: expected a mapping of token id to bias, got {type(logit_bias).__name__}")
    bias = torch.zeros(model.config.vocab_size, dtype=torch.float32)
    for key, value in logit_bias.items():
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < model.config.vocab_size:
            raise OffloadMoeError(f"logit_bias: key {key!r} is not a token id in 0..{model.config.vocab_size - 1}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -100 <= value <= 100:
            raise OffloadMoeError(f"logit_bias[{key!r}] = {value!r}, expected a number from -100 to 100")
        bias[token] = float(value)
    return bias.to(model.device)


def check_penalties(min_p, repetition_penalty, presence_penalty, frequency_penalty) -> None:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if not (number(min_p) and 0 <= min_p <= 1):
        raise OffloadMoeError(f"min_p = {min_p!r}, expected a number from 0 to 1")
    if not (number(repetition_penalty) and 0 < repetition_penalty < math.inf):
        raise OffloadMoeError(f"repetition_penalty = {repetition_penalty!r}, expected a number > 0 (1.0 is off)")
    for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not (number(v) and -2 <= v <= 2):
            raise OffloadMoeError(f"{name} = {v!r}, expected a number from -2 to 2 (0 is off)")


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def process_memory() -> dict:
    """This process's resident memory by kind (/proc/self/status; {} where there is none): anonymous
    (KV cache, activations, copies: what the kernel must keep) and file pages (weights mapped from
    their file: what it may drop and read again)."""
    keys = {"RssAnon:": "anonymous_bytes", "RssFile:": "file_bytes", "RssShmem:": "shared_bytes"}
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = keys.get(line.split(" ", 1)[0].split("\t", 1)[0])
                if key:
                    out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out
