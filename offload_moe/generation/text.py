"""Text in and out: `tokenizer.json` through `tokenizers`, the chat template through sandboxed jinja2
with limits (`template_sandbox`),
and incremental decoding that never emits half a UTF-8 character."""

from __future__ import annotations

from pathlib import Path

from . import template_sandbox
from .chat_template import find_chat_template, no_template_message
from ..base.errors import OffloadMoeError
from ..base.user_files import read_json_object, regular_file

MAX_TEMPLATE_CHARS = template_sandbox.MAX_CHARS  # a rendered chat prompt longer than this is a runaway template


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
        regular_file(file, "tokenizer file")
        try:
            self.backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise OffloadMoeError(f"{file}: cannot be read as a tokenizers file ({e})") from None
        config_file = directory / "tokenizer_config.json"
        config = {}
        if config_file.exists():
            config = read_json_object(config_file, "tokenizer config")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.template = find_chat_template(directory, config)  # chat_template.jinja, tokenizer_config...
        self.chat_template, self.source = self.template.text, self.template.source

    @classmethod
    def from_parts(cls, backend, bos_token: str | None, eos_token: str | None, chat_template: str | None,
                   source: str) -> "Tokenizer":
        """A tokenizer built elsewhere (a GGUF header's, `gguf/tokenizer.py`) with its special tokens."""
        self = cls.__new__(cls)
        self.backend, self.bos_token, self.eos_token = backend, bos_token, eos_token
        self.chat_template, self.source = chat_template, source
        return self

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from JSON "\ud800"
            raise OffloadMoeError(f"prompt: character {e.start} is {text[e.start]!r}, a lone surrogate "
                                  "(expected valid Unicode text)") from None
        # encode_batch lets go of the GIL while it works (encode does not): a server tokenizing a long
        # prompt on a worker thread keeps its event loop answering.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, template_vars: dict | None = None) -> str:
        """Render messages (and the tools the model may call) with the checkpoint's chat template, as
        transformers does. A message's extra keys (tool_calls, tool_call_id, name) reach the template;
        template_vars are further variables the template may read (gpt-oss's reasoning_effort)."""
        if not self.chat_template:
            raise OffloadMoeError(no_template_message(self.template))
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                    isinstance(m.get("content"), str) or (m.get("content") is None and m.get("tool_calls"))):
                raise OffloadMoeError(f"message {i}: expected {{'role': str, 'content': str}}, got {m!r}")
        from jinja2 import TemplateSyntaxError

        extra = {**(template_vars or {}), **({"tools": tools} if tools else {})}
        try:
            return template_sandbox.render(self.chat_template, messages=messages,
                                           add_generation_prompt=add_generation_prompt,
                                           bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except TemplateSyntaxError as e:
            raise OffloadMoeError(f"{self.source}: chat_template does not parse ({_one_line(e)})") from None
        except template_sandbox.TemplateRaised as e:
            raise OffloadMoeError(f"{self.source}: chat template refused the messages: {_one_line(e)}") from None
        except template_sandbox.TemplateLimit as e:
            raise OffloadMoeError(f"{self.source}: chat_template stopped by the sandbox: {e} "
                                  "(a runaway template)") from None
        except Exception as e:  # the template is the checkpoint's code: any failure is its fault
            raise OffloadMoeError(f"{self.source}: chat_template failed ({type(e).__name__}: {_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:200] + "..."


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
