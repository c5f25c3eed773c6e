"""A decode step's layer in one C call (`layer_step.LayerFront`, `decode_layer.c`): the attention
half and router (`LayerFront.__call__`), and the whole layer where the experts provider hands out a
C table of its experts (`LayerFront.whole`: a GGUF's stacked experts where they lie), against the
call-by-call path they replace: the same kernels with the same arguments, so the logits are the same
bits, one sequence and a batched step, fp32 and bf16, GGUF block types and our own int4 format."""

from __future__ import annotations

import contextlib

import pytest
import torch
from gguf import GGMLQuantizationType as T

import offload_moe
from offload_moe.kernels import layer_step, native

pytestmark = pytest.mark.skipif(native.load_decode() is None, reason="no kernel library (needs a C compiler)")

DEMO = offload_moe.__path__[0] + "/demo"
PROMPTS = ["ROMEO. What light through yonder window breaks?", "HAMLET. To be, or not to be",
           "Friends, Romans,", "KING. Now is the winter of our discontent"]


@contextlib.contextmanager
def call_by_call(model):
    """The layers' one-call fronts (and the whole-stack call) taken away for the block."""
    t = model.transformer
    kept, stack = [layer.front for layer in t.layers], t.stack
    for layer in t.layers:
        layer.front = None
    t.stack = None
    try:
        yield
    finally:
        for layer, front in zip(t.layers, kept):
            layer.front = front
        t.stack = stack


@contextlib.contextmanager
def layer_by_layer(model):
    """The whole-stack call taken away: one C call per layer."""
    t = model.transformer
    stack, t.stack = t.stack, None
    try:
        yield
    finally:
        t.stack = stack


@contextlib.contextmanager
def front_only(monkeypatch):
    """The whole-layer and whole-stack calls taken away: attention half and router in C, experts
    through Python."""
    with monkeypatch.context() as m:
        m.setattr(layer_step.LayerFront, "whole", lambda self, *a: None)
        m.setattr(layer_step.LayerStack, "__call__", lambda self, *a: None)
        yield


@pytest.fixture
def front_calls(monkeypatch):
    """How many layer steps one C call computed: [fronts, whole layers, whole stacks]."""
    count = [0, 0, 0]
    call, whole, stack = layer_step.LayerFront.__call__, layer_step.LayerFront.whole, layer_step.LayerStack.__call__

    def counted(self, *a):
        out = call(self, *a)
        count[0] += out is not None
        return out

    def counted_whole(self, *a):
        out = whole(self, *a)
        count[1] += out is not None
        return out
    def counted_stack(self, *a):
        out = stack(self, *a)
        count[2] += out is not None
        return out
    monkeypatch.setattr(layer_step.LayerFront, "__call__", counted)
    monkeypatch.setattr(layer_step.LayerFront, "whole", counted_whole)
    monkeypatch.setattr(layer_step.LayerStack, "__call__", counted_stack)
    return count


def decode_logits(model, prompt: str, steps: int) -> torch.Tensor:
    """Greedy steps of one sequence from a fresh cache: (steps, V) logits."""
    t = model.transformer
    t.kv_slots.clear()
    ids = model.encode_prompt(prompt)
    logits = t(torch.tensor([ids]), start=0, slot=0, last_only=True)[:, -1]
    out, pos = [], len(ids)
    for _ in range(steps):
        token = logits.argmax(-1)
        logits = t(token.view(1, 1), start=pos, slot=0)[:, -1]
        out.append(logits)
        pos += 1
    return torch.cat(out)


def gguf_demo(tmp_path_factory, qtype):
    from gguf_fixtures import write_gguf

    return write_gguf(DEMO, tmp_path_factory.mktemp("front") / f"demo-{qtype.name}.gguf", experts=qtype,
                      attention=qtype, embeddings=T.Q8_0)


@pytest.fixture(scope="module", params=[T.Q8_0, T.Q4_0], ids=lambda q: q.name)
def gguf_path(request, tmp_path_factory):
    return gguf_demo(tmp_path_factory, request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_sequence_is_bitwise_the_call_by_call_path(gguf_path, dtype, front_calls, monkeypatch):
    model = offload_moe.load(str(gguf_path), dtype=dtype)
    layers = len(model.transformer.layers)
    stacked = decode_logits(model, PROMPTS[0], 6)
    assert front_calls == [0, 0, 6]                # every step through every layer in one call
    with layer_by_layer(model):
        whole = decode_logits(model, PROMPTS[0], 6)
    assert front_calls == [0, 6 * layers, 6]       # every layer of every step in one call
    with front_only(monkeypatch):
        front = decode_logits(model, PROMPTS[0], 6)
    assert front_calls == [6 * layers, 6 * layers, 6]
    with call_by_call(model):
        plain = decode_logits(model, PROMPTS[0], 6)
    assert front_calls == [6 * layers, 6 * layers, 6]
    assert torch.equal(stacked, plain) and torch.equal(whole, plain) and torch.equal(front, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_our_int4_format_takes_the_one_call_too(tmp_path_factory, dtype, front_calls):
    """The demo quantized to our own format (int4 attention and experts: `QmvGroup`, `QmvMatrix`)."""
    path = tmp_path_factory.mktemp("int4") / "demo-int4"
    offload_moe.quantize(DEMO, path, experts="int4", attention="int4", method="rtn", group_size=32)
    model = offload_moe.load(str(path), dtype=dtype)
    fused = decode_logits(model, PROMPTS[1], 5)
    assert front_calls == [5 * len(model.transformer.layers), 0, 0]   # our format's experts: no C table (yet)
    with call_by_call(model):
        plain = decode_logits(model, PROMPTS[1], 5)
    assert torch.equal(fused, plain)


def test_a_batched_step_is_bitwise_the_call_by_call_path(gguf_path, front_calls, monkeypatch):
    model = offload_moe.load(str(gguf_path), dtype=torch.float32)
    t = model.transformer
    t.set_slots(4)
    try:
        ids = [model.encode_prompt(p) for p in PROMPTS]
        for slot, seq in enumerate(ids):
            t(torch.tensor([seq[:-1]]), start=0, slot=slot)
        last = torch.tensor([seq[-1] for seq in ids])
        positions = [len(seq) - 1 for seq in ids]
        snapshot = [(c.k.clone(), c.v.clone()) for c in t.kv_caches]
        def step():
            for c, (k, v) in zip(t.kv_caches, snapshot):   # the same cache state for every path
                c.k.copy_(k), c.v.copy_(v)
            return t.decode_rows(last, list(range(4)), positions)                       # (4, V)
        stacked = step()
        assert front_calls == [0, 0, 1]
        with layer_by_layer(model):
            whole = step()
        assert front_calls == [0, len(t.layers), 1]
        with front_only(monkeypatch):
            front = step()
        assert front_calls == [len(t.layers), len(t.layers), 1]
        with call_by_call(model):
            plain = step()
        assert torch.equal(stacked, plain) and torch.equal(whole, plain) and torch.equal(front, plain)
    finally:
        t.set_slots(1)


def test_prefill_and_a_forced_routing_keep_their_paths(gguf_path, front_calls):
    """A prompt (T > 1) never takes the one call; a routing strategy's forced ids win over the
    call's router (the call still computes attention)."""
    model = offload_moe.load(str(gguf_path), dtype=torch.float32)
    t = model.transformer
    prompt = torch.tensor([model.encode_prompt(PROMPTS[2])])

    class Forced:
        def forced(self, layer, n):
            return (torch.arange(t.config.top_k) + layer).remainder(t.config.num_experts).repeat(n, 1)

        def guess(self, layer, n):
            return None

    def step():
        t.kv_slots.clear()
        t(prompt, start=0, slot=0)
        return t(torch.tensor([[5]]), start=prompt.shape[1], slot=0)

    t.set_routing(Forced())
    try:
        fused = step()
        assert front_calls == [len(t.layers), 0, 0]  # the one decode step, not the prompt; never whole
        with call_by_call(model):
            plain = step()
        assert torch.equal(fused, plain)
    finally:
        t.set_routing(None)
    assert not torch.equal(fused, step())           # the forced ids were used
