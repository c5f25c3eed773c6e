"""Every supported MoE family against its transformers class, on tiny random checkpoints (fp32):
logits and 32 greedy tokens, all experts resident and through the offloading engine (2 slots)."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import offload_moe
from offload_moe import OffloadMoeError
from offload_moe.checkpoints.config import SUPPORTED_MODEL_TYPES, ModelConfig
from offload_moe.placement.planner import plan
from offload_moe.placement.profiles import load_profile
from offload_moe import Placement
from conftest import randomised

DATA = Path(__file__).parent / "data"
PROMPT = [1, 17, 42, 5, 66, 23]
BASE = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family case -> (transformers class name, config overrides). Each exercises what its family adds.
FAMILIES = {
    # q/k norm per head, head_dim != hidden / heads, a dense layer, top-k renormalised
    "qwen3_moe": ("Qwen3Moe", dict(num_hidden_layers=3, head_dim=16, intermediate_size=40, moe_intermediate_size=24,
                                   num_experts=6, norm_topk_prob=True, mlp_only_layers=[1])),
    # q/k norm over the whole projection, clip_qkv, no renormalisation, top-3
    "olmoe": ("Olmoe", dict(num_hidden_layers=2, intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                            clip_qkv=1.5, norm_topk_prob=False)),
    # q/k/v biases, a sigmoid-gated shared expert, every other layer dense (decoder_sparse_step)
    "qwen2_moe": ("Qwen2Moe", dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24,
                                   shared_expert_intermediate_size=48, num_experts=6, decoder_sparse_step=2)),
    # MLA without a q low-rank pair, two shared experts, a dense first layer, greedy routing
    "deepseek_v2": ("DeepseekV2", dict(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=40,
                                       moe_intermediate_size=24, n_routed_experts=6, n_shared_experts=2,
                                       first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)),
    # MLA with a q low-rank pair, group-limited routing, routed_scaling_factor, YaRN with mscale
    "deepseek_v2_group": ("DeepseekV2", dict(num_hidden_layers=2, num_key_value_heads=4, intermediate_size=40,
                                             moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
                                             first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=12,
                                             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                             topk_method="group_limited_greedy", n_group=4, topk_group=1,
                                             routed_scaling_factor=2.0,
                                             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                                  original_max_position_embeddings=32, mscale=0.8,
                                                                  mscale_all_dim=0.8))),
    # sinks, sliding/full layers (window 5 < the sequences), biases everywhere, clamped SwiGLU, YaRN
    "gpt_oss": ("GptOss", dict(num_hidden_layers=2, head_dim=8, intermediate_size=32, num_local_experts=6,
                               sliding_window=5, swiglu_limit=1.0,
                               rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                                    beta_slow=1.0, original_max_position_embeddings=32,
                                                    truncate=False))),
    # hybrid: Gated DeltaNet layers (grouped projections, 2 key heads to 4 value heads, odd head dims) around a
    # gated full-attention layer (partial rotary, zero-centred norms), a dense layer, a gated shared expert
    "qwen3_next": ("Qwen3Next", dict(num_hidden_layers=4, head_dim=16, intermediate_size=40, moe_intermediate_size=24,
                                     shared_expert_intermediate_size=20, num_experts=7, mlp_only_layers=[2],
                                     linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=10,
                                     linear_value_head_dim=6, linear_conv_kernel_dim=4, full_attention_interval=2,
                                     norm_topk_prob=False)),
    # the same with split projections (in_proj_qkv, _z, _b, _a), 3 key heads to 3 value heads, M-RoPE (text)
    "qwen3_5_moe": ("Qwen3_5MoeText", dict(num_hidden_layers=3, head_dim=8, moe_intermediate_size=24,
                                           shared_expert_intermediate_size=28, num_experts=9, num_experts_per_tok=3,
                                           linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=6,
                                           linear_value_head_dim=10, linear_conv_kernel_dim=3,
                                           layer_types=["linear_attention", "full_attention", "linear_attention"])),
}
CASES = [(name, mode) for name in FAMILIES for mode in ("resident", "offloaded")]


def tiny_model(name: str, seed: int = 0):
    """A random fp32 model of the family, weights scaled up so routing is decisive."""
    prefix, overrides = FAMILIES[name]
    config = getattr(transformers, f"{prefix}Config")(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model_class = getattr(transformers, f"{prefix}ForCausalLM", None) or \
        getattr(transformers, f"{prefix.removesuffix('Text')}ForCausalLM")   # Qwen3_5MoeTextConfig: Qwen3_5MoeForCausalLM
    return randomised(model_class(config))   # biases and sinks drawn too


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(name, fused) -> (directory, transformers model, its greedy tokens), built once per family."""
    cache = {}

    def get(name: str, fused: bool = False):
        if (name, fused) not in cache:
            model = cache[(name, False)][1] if fused else tiny_model(name)
            d = tmp_path_factory.mktemp(f"{name}-{'fused' if fused else 'per-expert'}")
            model.save_pretrained(d, save_original_format=not fused)
            cache[(name, fused)] = d, model, None if fused else greedy_tokens(model)
        return cache[(name, fused)]
    return get


def greedy_tokens(model) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def load(directory, mode):
    return offload_moe.load(directory, Placement(cache_slots=2) if mode == "offloaded" else None, device="cpu")


def max_diff(model, reference) -> float:
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    return (model.logits(ids) - expected).abs().max().item()


@pytest.mark.parametrize("name,mode", CASES)
def test_logits_and_greedy_tokens_match_transformers(checkpoint, name, mode):
    directory, reference, expected_tokens = checkpoint(name)
    model = load(directory, mode)
    assert max_diff(model, reference) <= 1e-4
    assert model.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == expected_tokens
    if mode == "offloaded":
        assert model.stats["experts"]["misses"] > 0


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v2"])
def test_fused_expert_layout_matches_transformers(checkpoint, name):
    checkpoint(name)
    directory, reference, _ = checkpoint(name, fused=True)
    assert max_diff(load(directory, "offloaded"), reference) <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_parameter_counts_equal_the_model(checkpoint, name):
    """ModelConfig's total counts every parameter transformers' model has."""
    directory, reference, _ = checkpoint(name)
    assert ModelConfig.load(directory).total_params == sum(p.numel() for p in reference.parameters())


def test_unsupported_model_type_names_it_and_lists_the_supported(tmp_path):
    with pytest.raises(OffloadMoeError) as e:
        ModelConfig.from_dict({"model_type": "llama"})
    message = str(e.value)
    assert "\n" not in message and "'llama'" in message
    assert f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}" in message
    assert set(SUPPORTED_MODEL_TYPES) == {"mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2", "gpt_oss",
                                          "deepseek_v3", "kimi_k2", "glm4_moe", "glm4_moe_lite", "minimax_m2",
                                          "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "llama4", "llama4_text"}


# ---- published full-size configs: parameter counts by hand, and a plan under 8 GB / 12 GB ----
def swiglu(hidden, inner):
    return 3 * hidden * inner


# (file, total, active): each term written out from the published config.json.
PUBLISHED = {
    # 48 layers, H 2048, 32 heads × 128 (q 4096), 4 KV heads × 128 (512), 128 experts × 768, top-8
    "qwen3-30b-a3b": (48 * (2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2 * 128)   # q, k, v, o, q/k norms
                      + 48 * 128 * 2048 + (2 * 48 + 1) * 2048 + 2 * 151936 * 2048,   # routers, norms, embeddings
                      48 * 128 * swiglu(2048, 768), 48 * 8 * swiglu(2048, 768)),
    # 16 layers, H 2048, 16 heads × 128, full q/k norms (2048 each), 64 experts × 1024, top-8
    "olmoe-1b-7b-0924": (16 * (4 * 2048 * 2048 + 2 * 2048) + 16 * 64 * 2048 + (2 * 16 + 1) * 2048
                         + 2 * 50304 * 2048,
                         16 * 64 * swiglu(2048, 1024), 16 * 8 * swiglu(2048, 1024)),
    # 27 layers, H 2048, MLA (16 heads, q 192 = 128 + 64, latent 512, v 128), layer 0 dense (10944),
    # 26 MoE layers of 64 experts × 1408, top-6, 2 shared experts (2816 wide)
    "deepseek-v2-lite": (27 * (2048 * 16 * 192 + 2048 * (512 + 64) + 512 + 512 * 16 * (128 + 128) + 16 * 128 * 2048)
                         + swiglu(2048, 10944) + 26 * (64 * 2048 + swiglu(2048, 2816))
                         + (2 * 27 + 1) * 2048 + 2 * 102400 * 2048,
                         26 * 64 * swiglu(2048, 1408), 26 * 6 * swiglu(2048, 1408)),
    # 24 layers, H 2880, 64 heads × 64 (q 4096), 8 KV heads × 64 (512), biases on q/k/v/o, sinks;
    # 32 experts × 2880 with biases (2·2880 + 2880), top-4; routers with biases
    "gpt-oss-20b": (24 * (2880 * 4096 + 4096 + 2 * (2880 * 512 + 512) + 4096 * 2880 + 2880 + 64)
                    + 24 * 32 * (2880 + 1) + (2 * 24 + 1) * 2880 + 2 * 201088 * 2880,
                    24 * 32 * (swiglu(2880, 2880) + 3 * 2880), 24 * 4 * (swiglu(2880, 2880) + 3 * 2880)),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_counts_and_plans(name):
    config = ModelConfig.load(DATA / f"{name}-config.json")
    shared, experts, active_experts = PUBLISHED[name]
    assert config.total_params == shared + experts
    assert config.active_params == shared + active_experts
    for profile in ("8gb", "12gb"):
        p = plan(config, load_profile(profile), ram_available=64 * 10**9)
        assert 1 <= p.slots_per_layer <= config.num_experts and p.vram_bytes <= load_profile(profile).vram_budget
        assert p.experts_bits == ("mxfp4" if name == "gpt-oss-20b" else load_profile(profile).experts_bits)


def test_published_totals_are_the_advertised_sizes():
    billions = {name: ModelConfig.load(DATA / f"{name}-config.json").total_params / 1e9 for name in PUBLISHED}
    assert [math.floor(b * 10) / 10 for b in billions.values()] == [30.5, 6.9, 15.7, 20.9]


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "olmoe-1b-7b-0924", "deepseek-v2-lite", "gpt-oss-20b"])
def test_synthetic_checkpoint_reads_like_a_real_one(name):
    from offload_moe.checkpoints.synthetic import SyntheticCheckpoint, synthetic_config
    known = name.replace("-0924", "")
    ckpt = SyntheticCheckpoint(known, layers=2, scale=0.05)
    c = ckpt.config
    assert c.model_type == json.loads((DATA / f"{name}-config.json").read_text())["model_type"]
    model = offload_moe.load(ckpt, Placement(cache_slots=2, context_length=64), device="cpu", dtype=torch.float32,
                             profile=None)
    assert len(model.generate([1, 2, 3], max_new_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3
    assert synthetic_config(known).total_params == ModelConfig.load(DATA / f"{name}-config.json").total_params


# ---- gpt-oss as published: MXFP4 experts, kept packed ----
def test_mxfp4_dequantization_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from offload_moe.kernels.mxfp4 import dequantize
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=g)   # [E, out, in/32, 16]
    scales = torch.randint(118, 136, (3, 8, 2), dtype=torch.uint8, generator=g)     # [E, out, in/32]
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)     # [E, in, out]
    assert torch.equal(dequantize(blocks, scales).transpose(1, 2), expected)


def test_mxfp4_checkpoint_matches_transformers_and_stays_packed(tmp_path):
    """A tiny gpt-oss whose experts are random MXFP4 codes: our run over the packed checkpoint
    against transformers' model holding the same experts dequantized."""
    from safetensors.torch import load_file, save_file

    from offload_moe.kernels.mxfp4 import MXFP4Weight, dequantize, nbytes_for
    reference = tiny_model("gpt_oss")
    c = reference.config
    H, I, E = c.hidden_size, c.intermediate_size, c.num_local_experts
    assert H % 32 == 0 and I % 32 == 0
    g = torch.Generator().manual_seed(5)
    packed = {}
    for i, layer in enumerate(reference.model.layers):
        p = f"model.layers.{i}.mlp.experts."
        for proj, (out, inp) in {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}.items():
            blocks = torch.randint(0, 256, (E, out, inp // 32, 16), dtype=torch.uint8, generator=g)
            scales = torch.randint(122, 125, (E, out, inp // 32), dtype=torch.uint8, generator=g)
            packed |= {p + f"{proj}_blocks": blocks, p + f"{proj}_scales": scales}
            getattr(layer.mlp.experts, proj).data = dequantize(blocks, scales).transpose(1, 2).contiguous()
    reference.save_pretrained(tmp_path)
    tensors = {k: v for k, v in load_file(tmp_path / "model.safetensors").items()
               if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file(tensors | packed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = load(tmp_path, "offloaded")
    assert max_diff(model, reference) <= 1e-4
    assert model.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == greedy_tokens(reference)
    slot = model.experts.layout.view(model.experts.buffers[0][0])
    assert isinstance(slot.w1, MXFP4Weight)  # slots hold codes and exponents, not floats
    assert model.experts.layout.nbytes < nbytes_for(2 * I, H) + nbytes_for(H, I) + 4 * (2 * I + H) + 5 * 64


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "gpt-oss-20b"])
def test_bench_runs_the_family_synthetic_models(tmp_path, name):
    """`offload-moe bench --synthetic <family>` scaled down: every row ran and the engine's
    accounting holds (bytes moved = (misses + prefetches) x bytes per expert)."""
    import json

    from offload_moe.cli.main import main

    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()  # --threads sets torch's global thread count: restore it
    try:
        assert main(["bench", "--synthetic", name, "--layers", "2", "--scale", "0.05", "--tokens", "4",
                     "--prompt-tokens", "4", "--threads", "1", "--device", "cpu", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    ran = [r for r in json.loads(out.read_text())["rows"] if r["status"] == "ok"]
    assert len(ran) >= 4  # engine, resident, on demand, LRU (accelerate needs CUDA)
    for r in ran:
        if r.get("misses") is not None and r.get("prefetch_issued") is not None:
            moved = r["misses"] - r.get("cpu_computed", 0) + r["prefetch_issued"]
            assert r["bytes_moved"] == moved * r["bytes_per_expert"]


@pytest.mark.parametrize("name", FAMILIES)
def test_info_sorts_every_familys_weights_as_the_config_counts_them(checkpoint, name, tmp_path):
    """`info`/`plan`'s weights by kind: the parameters of each kind are what ModelConfig counts, whether the
    checkpoint comes as safetensors (per expert or fused) or as a GGUF (llama.cpp's names, stacked experts)."""
    from gguf_fixtures import ARCH, write_gguf
    from offload_moe.api.sources import open_checkpoint

    directory, _, _ = checkpoint(name)
    sources = [directory]
    if ModelConfig.load(directory).model_type in ARCH:  # the hybrid families' GGUF comes from llama.cpp's converter
        sources.append(write_gguf(directory, tmp_path / "m.gguf", tokenizer=False))
    if name in ("qwen3_moe", "deepseek_v2"):
        sources.append(checkpoint(name, fused=True)[0])
    expected = ModelConfig.load(directory).params_by_kind()
    for source in sources:
        by_kind = open_checkpoint(source).weights_by_kind()
        assert {k: p for k, (p, _) in by_kind.items()} == expected, source
