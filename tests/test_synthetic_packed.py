"""`bench --synthetic NAME --bits B`: quantized synthetic checkpoints made directly in packed form,
so a full-size Mixtral-8x7B int4 is quick to build and plans (and pins) what its packed bytes need."""

import time

import pytest
import torch

import offload_moe
from offload_moe.cli.main import main
from offload_moe.experts.pinned import planned_bytes
from offload_moe.placement.planner import plan
from offload_moe.placement.profiles import load_profile
from offload_moe.kernels import QuantizedWeight
from offload_moe.checkpoints.synthetic import SyntheticCheckpoint, synthetic_config
from offload_moe import Placement

PROMPT = [3, 17, 42, 5, 66, 23, 9]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_synthetic_is_a_quantized_checkpoint(bits):
    ckpt = SyntheticCheckpoint("mixtral-8x7b", layers=2, scale=0.05, bits=bits)
    w = ckpt.expert(0, 1)
    H, I = ckpt.config.hidden_size, ckpt.config.intermediate_size
    assert all(isinstance(w[k], QuantizedWeight) and w[k].bits == bits for k in ("w1", "w3", "w2"))
    assert w["w1"].shape == (I, H) and w["w2"].shape == (H, I)
    q = ckpt.get_weight("model.layers.0.self_attn.q_proj.weight", (H, H))
    assert isinstance(q, QuantizedWeight) and q.bits == bits
    emb = ckpt.get_weight("model.embed_tokens.weight", (ckpt.config.vocab_size, H))
    assert emb.dtype == torch.bfloat16
    assert not torch.equal(w["w1"].packed, ckpt.expert(0, 2)["w1"].packed)  # experts differ
    assert torch.equal(w["w2"].dequantize(), ckpt.expert(0, 1)["w2"].dequantize())  # deterministic
    x = w["w1"].dequantize()
    assert 0.3 < float(x.std()) * H ** 0.5 < 1.5  # the scale of a trained layer's weights


def test_full_size_mixtral_int4_builds_fast_and_plans_12gb_without_pinning_137gb():
    t0 = time.perf_counter()
    ckpt = SyntheticCheckpoint("mixtral-8x7b", bits=4)
    experts = [ckpt.expert(layer, e) for layer in (0, 31) for e in range(8)]
    elapsed = time.perf_counter() - t0
    nbytes = sum(q.nbytes for w in experts for q in w.values()) // len(experts)
    assert nbytes == 99_090_432  # [14336, 4096] x 2 + [4096, 14336] at 4 bits, group 64
    assert elapsed < 60, elapsed  # bf16 randn took ~6 s per expert on this machine: here all 16 together
    p = plan(ckpt.config, load_profile("12gb"), ram_available=120 * 10**9)
    assert (p.experts_bits, p.attention_bits) == ("int4", "int4") and p.slots_per_layer >= 2
    assert p.experts_in_ram == 256 and p.bytes_per_expert == nbytes
    pinned = planned_bytes(256, p.bytes_per_expert)
    assert pinned <= 1.001 * 256 * nbytes < 26e9  # not 34 GB (power-of-two rounding), not 137 GB (bf16)


def test_packed_synthetic_offloaded_equals_resident():
    ckpt = SyntheticCheckpoint("mixtral-8x7b", layers=2, scale=0.05, bits=4)
    resident = offload_moe.load(ckpt, Placement(cpu_experts="none"), device="cpu", profile=None)
    offloaded = offload_moe.load(ckpt, Placement(cache_slots=2, cpu_experts="none"), device="cpu", profile=None)
    expect = resident.generate(PROMPT, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    assert offloaded.generate(PROMPT, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids == expect


def test_bench_cli_takes_a_bit_width(capsys, tmp_path):
    out = tmp_path / "r.json"
    threads = torch.get_num_threads()  # --threads sets this process's torch threads: put them back
    try:
        code = main(["bench", "--synthetic", "mixtral-8x7b", "--bits", "3", "--layers", "2", "--scale", "0.05",
                     "--tokens", "3", "--prompt-tokens", "4", "--no-baselines", "--json", str(out),
                     "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    import json
    result = json.loads(out.read_text())
    assert result["model"]["source"] == "synthetic:mixtral-8x7b-int3"
    assert result["rows"][0]["status"] == "ok"
    cfg = synthetic_config("mixtral-8x7b", layers=2, scale=0.05, bits=3)
    assert result["model"]["bytes_per_expert"] < 0.25 * 3 * 2 * cfg.hidden_size * cfg.intermediate_size
    assert main(["bench", "--bits", "4"]) != 0


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite", "gpt-oss-20b"])
def test_every_known_family_loads_packed(name):
    from offload_moe.checkpoints.synthetic import KNOWN_MODELS
    assert name in KNOWN_MODELS
    ckpt = SyntheticCheckpoint(name, layers=2, scale=0.05, bits=4)
    model = offload_moe.load(ckpt, Placement(cache_slots=2), device="cpu", profile=None)
    ids = model.generate(PROMPT, max_new_tokens=2, temperature=0, ignore_eos=True).token_ids
    assert len(ids) == 2 and all(0 <= i < ckpt.config.vocab_size for i in ids)
