"""Pre-quantized checkpoints read as published (FP8 blocks, compressed-tensors pack-quantized, GPTQ).

The kernels against float64 math on the float64 dequantization the test's own quantizer made
(odd sizes, partial blocks and groups, desc_act's shuffled groups); tiny Mixtral and Qwen3-MoE models
written in each format against transformers running the same model dequantized in float64; the
offloading engine against all-resident; `info` and `plan` naming the stored formats; bad files refused
with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import offload_moe
from offload_moe import OffloadMoeError
from offload_moe.checkpoints.checkpoint import Checkpoint
from offload_moe.kernels import native
from conftest import randomised
from offload_moe.kernels.published import TOLERANCE, FP8BlockWeight, GPTQWeight, IntPackWeight
from offload_moe.kernels.published_config import PublishedSpec

from published_fixtures import FORMATS, fp8_block, gptq, pack_quantized, write_published
from offload_moe import Placement

needs_kernel = pytest.mark.skipif(native.load("published") is None, reason="no C compiler for published_mv.c")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def form_of(fmt: str, parts: dict, shape, **kw):
    O, I = shape
    if fmt == "fp8":
        return FP8BlockWeight(parts["weight"].view(torch.uint8), parts["weight_scale_inv"], kw.get("block", (128, 128)))
    if fmt == "pack":
        return IntPackWeight(parts["weight_packed"], parts["weight_scale"], parts.get("weight_zero_point"),
                             kw["group"], kw["bits"], I, parts.get("weight_g_idx"))
    order = GPTQWeight.sorted_order(parts["g_idx"]) if kw.get("desc_act") else None
    return GPTQWeight(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], kw["bits"], kw["zero_offset"], order)


# (format, quantizer, form arguments, [O, I]) at odd sizes, partial blocks and groups
KERNEL_CASES = {
    "fp8_128": ("fp8", lambda w: fp8_block(w), {}, (259, 300)),
    "fp8_small_blocks": ("fp8", lambda w: fp8_block(w, (16, 32)), {"block": (16, 32)}, (37, 75)),
    "int4_pack_sym": ("pack", lambda w: pack_quantized(w, 4, 32, True), {"bits": 4, "group": 32}, (37, 100)),
    "int4_pack_asym": ("pack", lambda w: pack_quantized(w, 4, 32, False), {"bits": 4, "group": 32}, (41, 96)),
    "int4_pack_actorder": ("pack", lambda w: pack_quantized(w, 4, 24, False, actorder=True), {"bits": 4, "group": 24},
                           (29, 100)),
    "int8_pack": ("pack", lambda w: pack_quantized(w, 8, 16, True), {"bits": 8, "group": 16}, (19, 52)),
    "gptq4": ("gptq", lambda w: gptq(w, 4, 32), {"bits": 4, "zero_offset": 1}, (72, 200)),
    "gptq4_desc_act": ("gptq", lambda w: gptq(w, 4, 24, desc_act=True), {"bits": 4, "zero_offset": 1, "desc_act": True},
                       (136, 104)),
    "gptq4_shuffled_in_order": ("gptq", lambda w: gptq(w, 4, 24, desc_act=True), {"bits": 4, "zero_offset": 1}, (40, 64)),
    "gptq8_v2": ("gptq", lambda w: gptq(w, 8, 32, v1=False), {"bits": 8, "zero_offset": 0}, (68, 96)),
}


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_dequantization_is_the_quantizers_float64_weights(case):
    fmt, quantize, kw, shape = KERNEL_CASES[case]
    parts, ref = quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(3)))
    w = form_of(fmt, parts, shape, **kw)
    assert w.shape == shape
    assert torch.equal(w.dequantize(torch.float64), ref)
    assert torch.equal(w.dequantize_rows(5, 17, torch.float64), ref[5:17])


@needs_kernel
@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("tokens", [1, 5, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_float64_math(case, tokens, dtype):
    fmt, quantize, kw, shape = KERNEL_CASES[case]
    parts, ref = quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(4)))
    w = form_of(fmt, parts, shape, **kw)
    assert w.in_kernel
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(5)).to(dtype)
    y = w.linear(x)
    assert y.dtype == dtype and y.shape == (tokens, shape[0])
    bound = TOLERANCE if dtype == torch.float32 else 8e-3   # bf16 output rounding (2^-8 relative)
    assert rel_err(y, x.double() @ ref.T) < bound


@needs_kernel
def test_kernel_results_do_not_depend_on_the_thread_count():
    parts, _ = gptq(torch.randn(136, 104, generator=torch.Generator().manual_seed(6)), 4, 24, desc_act=True)
    w = form_of("gptq", parts, (136, 104), bits=4, zero_offset=1, desc_act=True)
    x = torch.randn(3, 104)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = w.linear(x)
        torch.set_num_threads(2)
        assert torch.equal(one, w.linear(x))
    finally:
        torch.set_num_threads(before)


def test_long_inputs_multiply_dequantized_rows():
    parts, ref = pack_quantized(torch.randn(40, 64), 4, 16, True)
    w = form_of("pack", parts, (40, 64), bits=4, group=16)
    x = torch.randn(100, 64)   # past DENSE_FROM: chunked dequantize-then-multiply
    assert rel_err(w.linear(x), x.double() @ ref.T) < TOLERANCE


# ---- whole models ----

BASE = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MODELS = {
    "mixtral": ("Mixtral", dict(num_hidden_layers=2, intermediate_size=48, num_local_experts=6)),
    # per-head q/k norms, head_dim 16, a dense layer (mlp_only_layers), expert width 24: partial groups
    "qwen3_moe": ("Qwen3Moe", dict(num_hidden_layers=3, head_dim=16, intermediate_size=40, moe_intermediate_size=24,
                                   num_experts=6, norm_topk_prob=True, mlp_only_layers=[1])),
}


def tiny(name: str, seed: int = 0):
    prefix, overrides = MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(getattr(transformers, f"{prefix}Config")(**{**BASE, **overrides}))
    return randomised(model, biases=False)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(model, format) -> (quantized directory, transformers on its float64 dequantization), built once."""
    cache = {}

    def get(name: str, fmt: str):
        if (name, fmt) not in cache:
            d = tmp_path_factory.mktemp(f"{name}-{fmt}")
            directory = write_published(tiny(name), d, fmt)
            reference = getattr(transformers, f"{MODELS[name][0]}ForCausalLM").from_pretrained(
                d / "reference", dtype=torch.float64, experts_implementation="eager").eval()
            cache[(name, fmt)] = directory, reference
        return cache[(name, fmt)]
    return get


IDS = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(1))


def oracle_logits(reference) -> torch.Tensor:
    with torch.no_grad():
        return reference(IDS).logits


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoint_logits_equal_the_float64_dequantized_model(published, name, fmt):
    directory, reference = published(name, fmt)
    expected = oracle_logits(reference)
    resident = offload_moe.load(directory, device="cpu", dtype="float32")
    logits = resident.logits(IDS)
    assert (logits.double() - expected).abs().max().item() <= 1e-4
    offloaded = offload_moe.load(directory, Placement(cache_slots=2), device="cpu", dtype="float32")
    # the same kernels on slot views; experts finish in another order, so sums may round differently
    torch.testing.assert_close(offloaded.logits(IDS), logits, rtol=0, atol=1e-5)
    assert offloaded.stats["experts"]["misses"] > 0


def test_weights_stay_in_the_stored_format_as_views_of_the_file(published):
    """On the CPU every quantized matrix is its stored tensors, views of the file's mapping (no copy)."""
    import ctypes

    directory, _ = published("qwen3_moe", "gptq_desc_act")
    ckpt = Checkpoint(directory)
    model = offload_moe.load(ckpt, device="cpu", dtype="float32")
    assert model.settings.weights == "mapped"
    weights = next(iter(model.experts.fetch(0, [0], 1)))[1].weights
    assert isinstance(weights.w1, GPTQWeight) and weights.w1.in_kernel
    info = ckpt.tensors["model.layers.0.mlp.experts.0.gate_proj.qweight"]
    base = ctypes.addressof(ctypes.c_char.from_buffer(ckpt._maps.base(info.file)))
    assert weights.w1.qweight.data_ptr() == base + info.offset
    assert ckpt.stored_types()["experts"] == ["gptq-int4"] and ckpt.stored_types()["routers"] == ["fp32"]


@pytest.mark.parametrize("fmt,stored", [("fp8", "fp8-block"), ("int4_pack", "int4-pack"), ("gptq8_v2", "gptq-int8")])
def test_info_and_plan_show_the_stored_types(published, fmt, stored, capsys):
    from offload_moe.cli.main import main

    directory, _ = published("mixtral", fmt)
    assert main(["info", str(directory)]) == 0
    out = capsys.readouterr().out
    assert f"experts {stored}" in " ".join(out.split()) and "routers fp32" in " ".join(out.split())
    assert main(["plan", str(directory), "--profile", "cpu"]) == 0
    assert stored in capsys.readouterr().out


@pytest.mark.parametrize("edit,expected", [
    (lambda q: q.update(weight_block_size=[128]), "weight_block_size [128], expected [rows, columns]"),
    (lambda q: q.update(quant_method="gptq", bits=3), "bits 3, expected 4 or 8"),
    (lambda q: q.update(quant_method="compressed-tensors", config_groups={"g": {"format": "float-quantized"}}),
     "format 'float-quantized', expected 'pack-quantized'"),
])
def test_bad_quantization_config_is_one_line(published, tmp_path, edit, expected):
    import shutil

    directory, _ = published("mixtral", "fp8")
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    config = json.loads((bad / "config.json").read_text())
    edit(config["quantization_config"])
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(OffloadMoeError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        Checkpoint(bad)


def test_a_scale_of_the_wrong_shape_is_named(published, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = published("mixtral", "int4_pack")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((directory / "config.json").read_text())
    state = load_file(directory / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight_scale"
    state[name] = state[name][:, :1].contiguous()
    save_file(state, bad / "model.safetensors")
    with pytest.raises(OffloadMoeError, match=f"tensor '{name}' is BF16 .* expected F32 or BF16 or F16"):
        Checkpoint(bad)


def test_spec_reads_the_published_configs():
    spec = PublishedSpec.from_config({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}, "config.json")
    assert (spec.stored, spec.group, spec.block_rows) == ("fp8-block", 128, 128)
    spec = PublishedSpec.from_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
                                      "sym": True}, "config.json")
    assert (spec.stored, spec.zero_offset, spec.desc_act) == ("gptq-int4", 1, True)
    assert PublishedSpec.from_config(FORMATS["int4_pack_asym"][1], "c").symmetric is False


def test_quantize_refuses_a_published_checkpoint(published, tmp_path):
    from offload_moe.tools.convert import quantize

    directory, _ = published("mixtral", "gptq")
    with pytest.raises(OffloadMoeError, match=r"already quantized \(gptq-int4, read as published\)"):
        quantize(directory, tmp_path / "out")
    assert not (tmp_path / "out").exists()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("fmt", ["fp8", "int4_pack_asym", "gptq_desc_act"])
def test_cuda_computes_the_published_formats(published, fmt):
    """On a GPU each form dequantizes its rows there (chunked), resident and in the engine's slots."""
    directory, reference = published("qwen3_moe", fmt)
    expected = oracle_logits(reference)
    for kw in ({}, {"cache_slots": 2}):
        model = offload_moe.load(directory, Placement(**kw), device="cuda", dtype="float32")
        assert (model.logits(IDS).double().cpu() - expected).abs().max().item() <= 1e-3


@pytest.mark.parametrize("fmt", ["fp8", "int4_pack_asym", "gptq_desc_act"])
def test_the_dequantizing_path_a_gpu_takes_matches_too(published, fmt, monkeypatch):
    """Without the kernel (as on CUDA, or with no C compiler) every form multiplies rows it dequantizes."""
    import offload_moe.kernels.published as forms

    monkeypatch.setattr(forms, "_lib", lambda: None)
    directory, reference = published("qwen3_moe", fmt)
    model = offload_moe.load(directory, Placement(cache_slots=2), device="cpu", dtype="float32")
    assert not next(iter(model.experts.fetch(0, [0], 1)))[1].weights.w1.in_kernel
    assert (model.logits(IDS).double() - oracle_logits(reference)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fmt", ["fp8", "int4_pack", "gptq", "gptq8_v2"])
def test_planned_expert_bytes_are_the_files(published, fmt):
    """The planner sizes a published format's expert as the file stores it (plan from config.json alone)."""
    from offload_moe.checkpoints.config import ModelConfig
    from offload_moe.placement.planner import plan
    from offload_moe.placement.profiles import load_profile

    directory, _ = published("qwen3_moe", fmt)
    ckpt = Checkpoint(directory)
    stored = sum(info.nbytes for name, info in ckpt.tensors.items() if ".layers.0.mlp.experts.0." in name)
    assert plan(ModelConfig.load(directory), load_profile("cpu")).bytes_per_expert == stored


def test_a_group_index_out_of_range_is_one_line(published, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = published("qwen3_moe", "gptq_desc_act")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((directory / "config.json").read_text())
    state = load_file(directory / "model.safetensors")
    name = "model.layers.2.mlp.experts.1.up_proj.g_idx"
    state[name] = state[name].clone()
    state[name][3] = 99
    save_file(state, bad / "model.safetensors")
    message = f"tensor '{name}' holds groups 0 .. 99, expected 0 .. 1"
    with pytest.raises(OffloadMoeError, match=message):   # the engine's host tier reads every expert at load
        offload_moe.load(bad, Placement(cache_slots=2), device="cpu", dtype="float32")
    model = offload_moe.load(bad, device="cpu", dtype="float32")   # resident views: read when first used
    with pytest.raises(OffloadMoeError, match=message):
        list(model.experts.fetch(1, [1], 1))


QWEN3_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
QWEN3_W4A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head", "re:.*mlp.gate$"],
               "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                                             "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                         "strategy": "group", "group_size": 128}}}}


@pytest.mark.parametrize("qconfig,stored,expert_bytes", [
    # gate/up [768, 2048], down [2048, 768]: 1 byte per weight + fp32 scales of 6 x 16 blocks
    (QWEN3_FP8, "fp8-block", 3 * (768 * 2048 + 4 * 6 * 16)),
    # 8 nibbles per int32, bf16 scales per 128 inputs, weight_shape int64 [2]
    (QWEN3_W4A16, "int4-pack", 2 * (768 * 2048 // 2 + 2 * 768 * 16 + 16) + (2048 * 768 // 2 + 2 * 2048 * 6 + 16)),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
     "gptq-int4", 2 * (2048 * 768 // 2 + 16 * 768 // 2 + 2 * 16 * 768 + 4 * 2048) + (768 * 2048 // 2 + 6 * 2048 // 2 + 2 * 6 * 2048 + 4 * 768)),
])
def test_plan_on_qwen3_30b_a3b_as_published_quantized(tmp_path, qconfig, stored, expert_bytes):
    from offload_moe.checkpoints.config import ModelConfig
    from offload_moe.placement.planner import plan
    from offload_moe.placement.profiles import load_profile

    config = json.loads((Path(__file__).parent / "data" / "qwen3-30b-a3b-config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}))
    p = plan(ModelConfig.load(tmp_path), load_profile("12gb"), ram_available=64 * 10**9)
    assert (p.experts_bits, p.attention_bits, p.embeddings_bits) == (stored, stored, "bf16")
    assert p.bytes_per_expert == expert_bytes


# the other families, one format each: MLA's projections (DeepSeek-V2), q/k/v biases read as dequantized
# floats and a shared expert (Qwen2-MoE), full-width q/k norms (OLMoE), gpt-oss's float stacked experts
OTHER_FAMILIES = [("olmoe", "int4_pack_asym"), ("qwen2_moe", "fp8"), ("qwen2_moe", "gptq_desc_act"),
                  ("deepseek_v2_group", "gptq8_v2"), ("deepseek_v2", "int4_pack"), ("gpt_oss", "fp8")]


@pytest.mark.parametrize("name,fmt", OTHER_FAMILIES)
def test_other_families_in_published_formats(tmp_path, name, fmt):
    from test_families import FAMILIES, tiny_model

    directory = write_published(tiny_model(name), tmp_path, fmt)
    reference = getattr(transformers, f"{FAMILIES[name][0]}ForCausalLM").from_pretrained(
        tmp_path / "reference", dtype=torch.float64, experts_implementation="eager").eval()
    expected = oracle_logits(reference)
    for kw in ({}, {"cache_slots": 2}):
        model = offload_moe.load(directory, Placement(**kw), device="cpu", dtype="float32")
        assert (model.logits(IDS).double() - expected).abs().max().item() <= 1e-4


def test_a_quantized_router_is_one_line(published, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = published("mixtral", "fp8")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((directory / "config.json").read_text())
    state = load_file(directory / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.gate.weight"
    state[name] = state[name].to(torch.float8_e4m3fn)
    state[name.removesuffix("weight") + "weight_scale_inv"] = torch.ones(1, 1)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(OffloadMoeError, match=f"'{name}' is stored fp8-block; a router or norm is read as the floats"):
        Checkpoint(bad)


def test_a_weight_shape_that_disagrees_with_the_config_is_one_line(published, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = published("mixtral", "int4_pack")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((directory / "config.json").read_text())
    state = load_file(directory / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight_shape"
    state[name] = torch.tensor([48, 40])
    save_file(state, bad / "model.safetensors")
    with pytest.raises(OffloadMoeError, match=rf"model.safetensors: tensor '{name}' is \[48, 40\], expected \[48, 32\]"):
        offload_moe.load(bad, Placement(cache_slots=2), device="cpu", dtype="float32")
