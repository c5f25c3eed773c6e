"""Text in and out: `tokenizer.json` through `tokenizers`, the chat template through sandboxed jinja2,
and incremental decoding that never emits half a UTF-8 character."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import OffloadMoeError


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A checkpoint's tokenizer, special tokens and chat template."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        file = directory / "tokenizer.json"
        try:
            self.backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise OffloadMoeError(f"{file}: cannot be read as a tokenizers file ({e})") from None
        config_file = directory / "tokenizer_config.json"
        config = {}
        if config_file.exists():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as e:
                raise OffloadMoeError(f"{config_file}: not valid JSON ({e})") from None
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default")
        self.source = str(config_file)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """Render messages (and the tools the model may call) with the checkpoint's chat template, as
        transformers does. A message's extra keys (tool_calls, tool_call_id, name) reach the template."""
        if not self.chat_template:
            raise OffloadMoeError(f"{self.source}: no chat_template, so chat is not available "
                                  "for this checkpoint (use a plain prompt)")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                    isinstance(m.get("content"), str) or (m.get("content") is None and m.get("tool_calls"))):
                raise OffloadMoeError(f"message {i}: expected {{'role': str, 'content': str}}, got {m!r}")
        template = _jinja_env().from_string(self.chat_template)
        try:
            extra = {"tools": tools} if tools else {}
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except _TemplateError as e:
            raise OffloadMoeError(f"{self.source}: chat template refused the messages: {e}") from None


class _TemplateError(Exception):
    pass


def _raise(message: str):
    raise _TemplateError(message)


def _jinja_env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
        x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class StreamDecoder:
    """Turn token ids into text pieces as they arrive.

    Byte-level tokens can split a character; decoding the tail of the sequence and holding back
    text that ends in U+FFFD (an incomplete UTF-8 sequence) until the next token completes it keeps
    every emitted piece valid. Decoding a short window (not the whole sequence) keeps it O(1) per
    token while letting the tokenizer handle leading-space rules at the boundary."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0   # window starts here
        self.read = 0     # text of ids[prefix:read] was already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character is emitted as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
