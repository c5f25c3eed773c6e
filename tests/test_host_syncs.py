"""Decode reads the device once per MoE layer (routing ids and prefetch guesses in one copy) and once
for the token. On the CPU the copies are counted at the one place they happen (`HostIds.read`); on
CUDA, torch's sync debug mode counts every synchronizing call of a decode step."""

from __future__ import annotations

import warnings

import pytest
import torch

import offload_moe
from offload_moe.generate import Sampling, decode_tokens
from offload_moe.model import HostIds

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def decode_reads(model, prompt, tokens: int, monkeypatch) -> list[int]:
    """How many times each step (prefill, then each decode step) read ids back to the host."""
    calls, per_step = [0], []
    real = HostIds.read

    def counted(self, *parts):
        calls[0] += 1
        return real(self, *parts)

    monkeypatch.setattr(HostIds, "read", counted)
    for _ in decode_tokens(model.transformer, prompt, tokens, Sampling(temperature=0)):
        per_step.append(calls[0])
        calls[0] = 0
    return per_step


@pytest.mark.parametrize("kw", [dict(), dict(cache_slots=2, prefetch=2)], ids=["resident", "offloaded"])
def test_one_read_per_moe_layer_and_step(tiny_checkpoint, kw, monkeypatch):
    model = offload_moe.load(tiny_checkpoint[0], device="cpu", **kw)
    reads = decode_reads(model, [3, 5, 7], 6, monkeypatch)
    assert reads == [model.config.num_moe_layers] * 6
    if kw:
        assert model.stats["experts"]["prefetch_issued"] > 0   # the guesses came back in those reads


def test_guesses_share_the_routing_ids_copy():
    """One buffer, one copy: the parts come back flattened in order, larger steps in one copy too."""
    ids = HostIds(6, torch.device("cpu"))
    a, b = torch.tensor([[1, 4]]), torch.tensor([[[2, 3]], [[5, 0]]])
    assert ids.read(a, b).tolist() == [1, 4, 2, 3, 5, 0]
    assert ids.read(torch.arange(10)).tolist() == list(range(10))


@needs_cuda
def test_cuda_decode_step_syncs_once_per_moe_layer(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], device="cuda", cache_slots=2, prefetch=1)
    model.generate([3, 5, 7], max_new_tokens=4, temperature=0)   # warm-up: allocations, lazy init
    torch.cuda.synchronize()
    steps = iter(decode_tokens(model.transformer, [3, 5, 7], 3, Sampling(temperature=0)))
    next(steps)                                                 # prefill
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            next(steps)                                         # one decode step, token read included
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == model.config.num_moe_layers + 1, [str(w.message) for w in syncs]
