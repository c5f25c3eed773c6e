"""Decode makes the host wait for the device once per MoE layer (routing ids and prefetch guesses in
one copy; the routing weights stay on the device) and once per token (the token read). On the CPU,
`SyncCounter` counts every operation that would be a sync on CUDA, for every family, resident,
offloaded, with the CPU tier and with packed int4/int8 weights, through the C decode step and
through the torch path CUDA runs; on CUDA, torch's sync debug mode counts the real ones."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import offload_moe
from offload_moe.experts.costs import CostModel, Throughput
from offload_moe.generation.generate import Sampling, decode_tokens
from offload_moe.model.moe import HostIds
from offload_moe.kernels import native
from offload_moe.checkpoints.synthetic import SyntheticCheckpoint
from sync_counter import SyncCounter
from test_families import FAMILIES, PROMPT, tiny_model
from offload_moe import Placement

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
STEPS = 5
MODES = {"resident": {}, "offloaded": dict(cache_slots=2, prefetch=1)}


def syncs_per_step(model, steps: int = STEPS) -> list[list[str]]:
    """What would sync on CUDA in each step (prefill with the first token, then each decode step)."""
    per_step = []
    with SyncCounter([model.transformer.ids_to_host.host]) as syncs:
        for _ in decode_tokens(model.transformer, PROMPT, steps, Sampling(temperature=0)):
            per_step.append(syncs.reset())
    return per_step


def assert_one_per_moe_layer_and_token(model):
    """Each decode step: one per MoE layer and the token's read; prefill: those and the prompt's upload."""
    per_step = syncs_per_step(model)
    expected = model.config.num_moe_layers + 1
    assert [len(s) for s in per_step] == [expected + 1] + [expected] * (STEPS - 1), per_step


@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory):
    """family name -> a directory holding its tiny random checkpoint (test_families' models)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name)
            tiny_model(name).save_pretrained(made[name])
        return made[name]
    return get


@pytest.fixture(params=["c_step", "torch_step"])
def decode_path(request, monkeypatch):
    """The C decode step (the CPU's), or the torch ops a CUDA model runs in its place."""
    if request.param == "torch_step":
        monkeypatch.setattr(native, "load_decode", lambda: None)
    return request.param


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mixtral", *FAMILIES])
def test_one_sync_per_moe_layer_and_token(name, mode, decode_path, family_checkpoint, tiny_checkpoint):
    directory = tiny_checkpoint[0] if name == "mixtral" else family_checkpoint(name)
    model = offload_moe.load(directory, Placement(**MODES[mode]), device="cpu")
    assert (model.transformer.moe_blocks[0].decode_route is None) == (decode_path == "torch_step")
    assert_one_per_moe_layer_and_token(model)
    if mode == "offloaded" and model.config.num_moe_layers > 1:
        assert model.stats["experts"]["prefetch_issued"] > 0   # the guesses came back in those reads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "glm4_moe_lite", "minimax_m2"])
def test_one_sync_per_moe_layer_and_token_sigmoid_routing(name, mode, decode_path, tmp_path):
    """The sigmoid-routed families (issue 27): routing, groups and the selection bias stay on the device."""
    from test_families_sigmoid import tiny_sigmoid_model
    tiny_sigmoid_model(name).save_pretrained(tmp_path)
    assert_one_per_moe_layer_and_token(offload_moe.load(tmp_path, Placement(**MODES[mode]), device="cpu"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_llama4_one_sync_per_moe_layer_and_token(name, mode, decode_path, tmp_path):
    """Llama 4's top-1 sigmoid routing, its weight scaling the expert's input, stays on the device too
    (with dense layers between the MoE ones in Maverick's shape)."""
    from test_llama4 import CASES, randomize, text_config
    randomize(transformers.Llama4ForCausalLM(text_config(name)), CASES[name][0]).save_pretrained(tmp_path)
    assert_one_per_moe_layer_and_token(offload_moe.load(tmp_path, Placement(**MODES[mode]), device="cpu"))


@pytest.mark.parametrize("bits", [4, 8])
def test_one_sync_per_moe_layer_and_token_quantized(bits, decode_path):
    """Packed experts and dense weights (the kernels read them where they are, no sync either)."""
    ckpt = SyntheticCheckpoint("mixtral-8x7b", layers=2, scale=0.02, bits=bits)
    assert_one_per_moe_layer_and_token(offload_moe.load(ckpt, Placement(**MODES["offloaded"]), device="cpu", profile=None))


def fake_costs() -> CostModel:
    """The CPU computes an expert far faster than the link copies it: every cold miss goes to the CPU."""
    return CostModel(1e9, {"fp32": Throughput(1e12)}, {"fp32": Throughput(1e12)}, "fake")


@pytest.mark.parametrize("kw", [dict(cpu_experts="hybrid", cpu_costs=fake_costs()), dict(cpu_experts=1)],
                         ids=["hybrid", "first_layer_on_cpu"])
def test_one_sync_per_moe_layer_and_token_with_the_cpu_tier(tiny_checkpoint, kw):
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, prefetch=1, **kw), device="cpu")
    assert_one_per_moe_layer_and_token(model)
    if kw["cpu_experts"] == "hybrid":
        assert model.stats["experts"]["cpu_computed"] > 0


def test_guesses_share_the_routing_ids_copy():
    """One buffer, one copy: the parts come back flattened in order, larger steps in one copy too."""
    ids = HostIds(6, torch.device("cpu"))
    a, b = torch.tensor([[1, 4]]), torch.tensor([[[2, 3]], [[5, 0]]])
    with SyncCounter([ids.host]) as syncs:
        assert ids.read(a, b).tolist() == [1, 4, 2, 3, 5, 0]
        assert ids.read(torch.arange(10)).tolist() == list(range(10))
        assert ids.read(a).tolist() == [1, 4]
    assert syncs.count == 3, syncs.where


# ---- the counter itself: each kind of sync counts once, host-side reads not at all ----
SYNCS = {
    "item": lambda x, host: x[0].item(),
    "int": lambda x, host: int(x[0]),
    "float": lambda x, host: float(x[1]),
    "bool": lambda x, host: bool(x[2] > 1),
    "tolist": lambda x, host: x.tolist(),
    "cpu": lambda x, host: x.cpu(),
    "nonzero": lambda x, host: torch.nonzero(x),
    "unique": lambda x, host: torch.unique(x),
    "bincount": lambda x, host: torch.bincount(x),
    "boolean mask": lambda x, host: x[x > 2],
    "boolean mask write": lambda x, host: x.clone().__setitem__(x > 2, 0),
    "masked_select": lambda x, host: torch.masked_select(x, x > 2),
    "copy into a host buffer": lambda x, host: host[:4].copy_(x),
    "cat into a host buffer": lambda x, host: torch.cat([x, x], out=host),
    "tensor on the device": lambda x, host: torch.tensor([1, 2], device=x.device),
}
NOT_SYNCS = {
    "device ops": lambda x, host: (x * 2 + 1).argsort()[x[:2]].sum(),
    "reading a host buffer": lambda x, host: host[:4].tolist() + [int(host[0])],
    "computing on the host": lambda x, host: torch.bincount(host[:4]).tolist(),
    "reading what .cpu() brought": lambda x, host: x.cpu()[1:].tolist(),   # the cpu() counts, below
    "copy into the device": lambda x, host: x.clone().copy_(host[:4]),
}


@pytest.mark.parametrize("op", SYNCS)
def test_counter_counts_each_sync_once(op):
    x, host = torch.tensor([3, 1, 4, 1]), torch.zeros(8, dtype=torch.long)
    with SyncCounter([host]) as syncs:
        SYNCS[op](x, host)
    assert syncs.count == 1, syncs.where


@pytest.mark.parametrize("op", NOT_SYNCS)
def test_counter_leaves_device_work_and_host_reads_alone(op):
    x, host = torch.tensor([3, 1, 4, 1]), torch.zeros(8, dtype=torch.long)
    with SyncCounter([host]) as syncs:
        NOT_SYNCS[op](x, host)
    assert syncs.count == (1 if op == "reading what .cpu() brought" else 0), syncs.where


@needs_cuda
def test_cuda_decode_step_syncs_once_per_moe_layer(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, prefetch=1), device="cuda")
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
