"""Helpers for the server tests: a tiny chat checkpoint built from scratch, and a real uvicorn server
running an app on a free localhost port in a background thread."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS]{{ m['content'] }}[/SYS]"
                 "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}"
                 "{{ eos_token }}{% endif %}{% endfor %}")
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny test model.",
             "Mixture of experts models route every token to a few experts.",
             "Offloading keeps the experts in host memory and streams them in.",
             "naïve café, straße, 日本語 🙂 and plain ascii words."]


def build_tiny_chat_checkpoint(directory: str | Path, *, seed: int = 0, context: int = 4096) -> Path:
    """A random fp32 MixtralForCausalLM (hidden 32, 2 layers, 4 experts) with a byte-level BPE
    tokenizer.json and a tokenizer_config.json carrying bos/eos and a jinja chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from conftest import tiny_mixtral

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))

    model = tiny_mixtral(seed, vocab_size=tok.get_vocab_size(), num_hidden_layers=2, num_local_experts=4,
                         max_position_embeddings=context)
    with torch.no_grad():
        model.lm_head.weight[2] = 0.0  # keep EOS rare, so greedy answers are not empty
    model.save_pretrained(directory, save_original_format=True)
    return directory


def feed_all(fmt, text, size=3):
    """A tool-call parser of format `fmt` fed `text` in pieces of `size` characters: (content, [(name, arguments)])."""
    from offload_moe.server.tools import ToolCallParser

    parser, content, calls = ToolCallParser(fmt), "", []
    for i in range(0, len(text), size):
        c, k = parser.feed(text[i:i + size])
        content, calls = content + c, calls + k
    c, k = parser.finish()
    return content + c, [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in calls + k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout: float = 20.0, **limits):
    """Serve `app` with uvicorn on 127.0.0.1:<free port> in a thread; yield the base URL. `limits`
    (header_timeout, max_connections...) go to the server's own `uvicorn_config`, as `serve` does."""
    import uvicorn

    from offload_moe.server.http import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2, **limits)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class HeldModel:
    """A model whose next generation stops at a scripted step until it is cancelled, so a test can
    disconnect while that request is certainly running, whatever the machine's speed.

    `hold(after=n)` arms it for the next generation only: its first n - 1 tokens run (their text
    reaches the client), then the n-th token's should_stop check waits until the server cancels the
    job (`reached` is set while it waits). Everything else is the wrapped model's."""

    def __init__(self, model, give_up: float = 30.0):
        self.model, self.give_up = model, give_up
        self.reached = threading.Event()
        self.after: int | None = None
        self.held_tokens: int | None = None   # tokens the held generation produced before it stopped

    def hold(self, after: int = 4):
        self.after, self.held_tokens = after, None
        self.reached.clear()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stream(self, prompt, *, should_stop=None, **kwargs):
        return self.model.stream(prompt, should_stop=self._should_stop(should_stop), **kwargs)

    def start(self, prompt, *, should_stop=None, **kwargs):  # what the server's worker calls
        return self.model.start(prompt, should_stop=self._should_stop(should_stop), **kwargs)

    def _should_stop(self, should_stop):
        """should_stop itself, or (when armed by `hold`) the check that waits at the n-th token."""
        after, self.after = self.after, None
        if after is None:
            return should_stop
        calls = 0

        def held() -> bool:
            nonlocal calls
            calls += 1
            self.held_tokens = calls
            if calls == after:
                self.reached.set()
                deadline = time.monotonic() + self.give_up  # never hang a broken test: it then fails
                while not should_stop() and time.monotonic() < deadline:
                    time.sleep(0.005)
            return should_stop()

        return held


# ---------------------------------------------------------------- fixtures the server test modules share

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny chat checkpoint with a tokenizer and chat template, built once per test module."""
    return build_tiny_chat_checkpoint(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """A second instance of the same model, used in the test thread (the server owns its own)."""
    import offload_moe

    return offload_moe.load(checkpoint, device="cpu")
