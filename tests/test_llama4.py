"""Llama 4 (text model) against transformers' `Llama4ForCausalLM` on tiny random fp32 checkpoints:
logits and greedy tokens all resident, through the offloading engine (2 slots) and with the prompt
prefilled in chunks; sequences longer than the attention chunk, so chunked local attention, the
NoPE layers' temperature and the rotation all show. Then the published configs' counts."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import offload_moe
from offload_moe import OffloadMoeError
from offload_moe.generation.batch import DecodeBatch
from offload_moe.checkpoints.config import ModelConfig
from offload_moe.generation.generate import DecodeTiming, Sampling
from offload_moe.placement.planner import plan
from offload_moe.placement.profiles import load_profile
from offload_moe import Placement

DATA = Path(__file__).parent / "data"
PROMPTS = [[1, 17, 42, 5, 66, 23], [1, 9, 80, 31, 4, 57, 12, 70, 33, 3, 45]]
NEW_TOKENS = 28   # prompt + new tokens > 3 chunks of every case's attention_chunk_size

# case -> config overrides and seed. Odd widths and vocabularies; chunks shorter than the sequences;
# a floor_scale small enough that the NoPE layers' query temperature changes along them.
CASES = {
    # Scout's shape: MoE in every layer, every 4th layer NoPE, L2 q/k norms, llama3-scaled RoPE
    "scout": (0, dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=24, intermediate_size_mlp=40, num_local_experts=5, interleave_moe_layer_step=1,
                      no_rope_layer_interval=4, attention_chunk_size=7, floor_scale=3, attn_scale=0.5,
                      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=16))),
    # Maverick's shape: MoE on odd layers, dense MLPs between, no q/k norms, plain RoPE
    "maverick": (1, dict(num_hidden_layers=4, hidden_size=36, num_attention_heads=6, num_key_value_heads=3, head_dim=6,
                         intermediate_size=23, intermediate_size_mlp=37, num_local_experts=7, interleave_moe_layer_step=2,
                         no_rope_layer_interval=2, attention_chunk_size=9, floor_scale=5, attn_scale=0.3,
                         use_qk_norm=False, vocab_size=101,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # two experts per token (the router's weights scale each one's input), no temperature tuning
    "top2": (2, dict(num_hidden_layers=3, hidden_size=40, num_attention_heads=4, num_key_value_heads=1, head_dim=10,
                     intermediate_size=19, intermediate_size_mlp=29, num_local_experts=6, num_experts_per_tok=2,
                     moe_layers=[0, 2], no_rope_layers=[1, 0, 1], attention_chunk_size=6,
                     attn_temperature_tuning=False, rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
}
BASE = dict(vocab_size=97, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def text_config(name: str) -> transformers.Llama4TextConfig:
    return transformers.Llama4TextConfig(**{**BASE, **CASES[name][1]})


def randomize(model, seed: int):
    """Weights scaled up so routing is decisive and attention not uniform."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.normal_(1, 0.1)
    return model


def greedy_tokens(model, prompt) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (directory, transformers model, greedy tokens of each prompt), built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = randomize(transformers.Llama4ForCausalLM(text_config(name)).eval(), CASES[name][0])
            d = tmp_path_factory.mktemp(f"llama4-{name}")
            model.save_pretrained(d)
            cache[name] = d, model, [greedy_tokens(model, p) for p in PROMPTS]
        return cache[name]
    return get


def load(directory, mode):
    return offload_moe.load(directory, Placement(**({"cache_slots": 2} if mode == "offloaded" else {})),
                            device="cpu")


def max_diff(model, reference) -> float:
    ids = torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(1))   # 30 > every chunk
    with torch.no_grad():
        expected = reference(ids).logits
    return (model.logits(ids) - expected).abs().max().item()


@pytest.mark.parametrize("mode", ["resident", "offloaded"])
@pytest.mark.parametrize("name", CASES)
def test_logits_and_greedy_tokens_match_transformers(checkpoint, name, mode):
    directory, reference, expected = checkpoint(name)
    model = load(directory, mode)
    assert max_diff(model, reference) <= 1e-4
    for prompt, tokens in zip(PROMPTS, expected):
        model.transformer.kv_slots.clear()
        assert model.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True).token_ids == tokens
    if mode == "offloaded":
        assert model.stats["experts"]["misses"] > 0


@pytest.mark.parametrize("name", CASES)
def test_prefill_in_chunks_matches_transformers(checkpoint, name):
    """The prompt fed 5 tokens at a time through the KV cache (chunk boundaries that fall inside
    attention chunks), then both prompts decoded together from two slots, prefilled 4 at a time."""
    directory, reference, expected = checkpoint(name)
    model = load(directory, "offloaded").transformer
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = reference(ids).logits                                                  # (1, 30, V)
    got = torch.cat([model(ids[:, a:a + 5], start=a) for a in range(0, 30, 5)], dim=1)
    assert (got - full).abs().max().item() <= 1e-4

    model.set_slots(2)
    try:
        batch = DecodeBatch(model, prefill_chunk=4)
        for i, prompt in enumerate(PROMPTS):
            batch.add(prompt, NEW_TOKENS, Sampling(temperature=0), DecodeTiming(), owner=i)
        got = {0: [], 1: []}
        while batch.sequences:
            for seq, token in batch.step():
                got[seq.owner].append(token)
                if seq.finished:
                    batch.remove(seq)
        assert [got[0], got[1]] == expected
    finally:
        model.set_slots(1)


@pytest.mark.parametrize("name", CASES)
def test_parameter_counts_equal_the_model(checkpoint, name):
    directory, reference, _ = checkpoint(name)
    assert ModelConfig.load(directory).total_params == sum(p.numel() for p in reference.parameters())


def test_conditional_generation_checkpoint_reads_the_text_model(checkpoint, tmp_path, caplog):
    """A `Llama4ForConditionalGeneration` checkpoint (config under text_config, tensors under
    language_model., a vision tower beside them): the text model loads, the vision tower is left out."""
    _, text_model, expected = checkpoint("scout")
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16,
                  pixel_shuffle_ratio=0.5)
    config = transformers.Llama4Config(text_config=text_config("scout").to_dict(), vision_config=vision)
    full = transformers.Llama4ForConditionalGeneration(config).eval()
    full.language_model.load_state_dict(text_model.state_dict())
    full.save_pretrained(tmp_path)
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"] \
        if (tmp_path / "model.safetensors.index.json").exists() else None
    assert names is None or any(n.startswith("vision_model.") for n in names)
    with caplog.at_level("INFO", logger="offload_moe"):
        model = load(tmp_path, "offloaded")
    assert model.config.model_type == "llama4" and "only the text model is read" in caplog.text
    assert max_diff(model, text_model) <= 1e-4
    reply = model.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    assert reply.token_ids == expected[0]
    by_kind = offload_moe.api.sources.open_checkpoint(tmp_path).weights_by_kind()
    assert {k: p for k, (p, _) in by_kind.items()} == model.config.params_by_kind()


def test_bad_config_names_the_key(tmp_path):
    raw = {"model_type": "llama4_text", **BASE, **CASES["maverick"][1], "num_experts_per_tok": 1,
           "no_rope_layers": [1, 2, 1, 0]}
    raw.pop("rope_parameters")
    with pytest.raises(OffloadMoeError, match=r"key 'no_rope_layers' = \[1, 2, 1, 0\], expected a list of 4 entries"):
        ModelConfig.from_dict(raw)
    with pytest.raises(OffloadMoeError, match=r"\(text_config\): missing key 'hidden_size'"):
        ModelConfig.from_dict({"model_type": "llama4", "text_config": {"model_type": "llama4_text"}})


# ---- published configs (tests/data/README.md): the counts, term by term and by transformers ----
def swiglu(hidden, inner):
    return 3 * hidden * inner


ATTENTION = 48 * (2 * 5120 * 5120 + 2 * 5120 * 1024)          # q, o: 40 heads x 128; k, v: 8 heads x 128
EMBEDDINGS, NORMS = 2 * 202048 * 5120, (2 * 48 + 1) * 5120
# (file, routed experts, router + shared expert + dense MLP parameters, published total B, active B)
PUBLISHED = {
    # 48 MoE layers of 16 experts x 8192, top-1, a shared expert (8192) in each
    "llama-4-scout-17b-16e": (48 * 16 * swiglu(5120, 8192), 48 * (16 * 5120 + swiglu(5120, 8192)), 109, 17),
    # 24 MoE layers (odd) of 128 experts x 8192 with a shared expert each, 24 dense layers of 16384
    "llama-4-maverick-17b-128e": (24 * 128 * swiglu(5120, 8192),
                                  24 * (128 * 5120 + swiglu(5120, 8192)) + 24 * swiglu(5120, 16384), 400, 17),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_counts_and_plans(name):
    raw = json.loads((DATA / f"{name}-config.json").read_text())
    config = ModelConfig.load(DATA / f"{name}-config.json")
    experts, device_mlps, total_b, active_b = PUBLISHED[name]
    shared = ATTENTION + EMBEDDINGS + NORMS + device_mlps
    assert config.total_params == shared + experts
    assert config.active_params == shared + experts // config.num_experts
    # transformers' own model of this config.json, built on the meta device: the text model is what we
    # count; Meta's advertised totals count the vision encoder too
    raw["text_config"]["attn_temperature_tuning"] = True   # transformers 5 takes a bool where Meta wrote 4
    with torch.device("meta"):
        reference = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**raw))
    assert config.total_params == sum(p.numel() for p in reference.language_model.parameters())
    with_vision = sum(p.numel() for p in reference.parameters())
    assert math.isclose(with_vision / 1e9, total_b, rel_tol=0.01) and round(config.active_params / 1e9) == active_b
    for profile in ("16gb", "24gb"):  # the shared weights alone (9-11 GB at int4) need more than 12 GB
        p = plan(config, load_profile(profile), ram_available=64 * 10**9)
        assert 1 <= p.slots_per_layer <= config.num_experts and p.vram_bytes <= load_profile(profile).vram_budget
    with pytest.raises(OffloadMoeError, match="8.00 GB is .* too small: shared weights .* profile 16gb"):
        plan(config, load_profile("8gb"), ram_available=64 * 10**9)


# ---- GGUF as llama.cpp's converter writes it ----
@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_gguf_from_the_converter_matches_the_safetensors_source(name, tmp_path):
    """`convert_hf_to_gguf.py` on the tiny model (llama3 RoPE as `rope_freqs`, experts split into
    gate/up/down stacks) loads and agrees with the safetensors checkpoint and transformers. llama.cpp
    fixes the chunk (8192), the NoPE interval (4), the temperature (8192, 0.1) and the q/k norms
    (off only with 128 experts) in code, so the tiny model takes those values."""
    import shutil

    from gguf_fixtures import llamacpp_convert, llamacpp_dir
    from offload_moe.base.runtime import DEMO_DIR
    if llamacpp_dir() is None:
        pytest.skip("llama.cpp's converter not available: set LLAMA_CPP_DIR to a llama.cpp checkout")
    fixed = dict(vocab_size=4096, attention_chunk_size=8192, no_rope_layer_interval=4, floor_scale=8192,
                 attn_scale=0.1, use_qk_norm=True)
    reference = randomize(transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
        **{**BASE, **CASES[name][1], **fixed})).eval(), CASES[name][0])
    src = tmp_path / "hf"
    reference.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / f, src / f)
    path = llamacpp_convert(src, tmp_path / f"{name}.gguf", "f32")
    ids = torch.randint(3, 4096, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
    from_gguf = offload_moe.load(path, Placement(cache_slots=2), device="cpu", dtype="float32")
    from_safetensors = offload_moe.load(src, device="cpu", dtype="float32")
    assert from_gguf.config.nope_layers == ModelConfig.load(src).nope_layers == (3,)
    assert (from_gguf.config.rope_scaling or {}).get("rope_type") == ("freq_factors" if name == "scout" else None)
    assert (from_gguf.logits(ids) - expected).abs().max().item() <= 1e-4
    assert (from_gguf.logits(ids) - from_safetensors.logits(ids)).abs().max().item() <= 1e-4
    prompt = [1, 17, 42, 5, 66, 23]
    assert from_gguf.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids == \
        greedy_tokens(reference, prompt)[:12]


@pytest.mark.parametrize("name", ["llama-4-scout-17b-16e", "llama-4-maverick-17b-128e"])
def test_synthetic_checkpoint_reads_like_a_real_one(name):
    """`--synthetic` Llama 4: the published text model's counts at full size, and a scaled-down one runs."""
    from offload_moe.checkpoints.synthetic import SyntheticCheckpoint, synthetic_config
    assert synthetic_config(name).total_params == ModelConfig.load(DATA / f"{name}-config.json").total_params
    scout = "scout" in name
    ckpt = SyntheticCheckpoint(name, layers=4 if scout else 2, scale=0.05)     # Maverick: 128 experts a layer
    assert ckpt.config.nope_layers == ((3,) if scout else ())
    assert ckpt.config.moe_layers == ((0, 1, 2, 3) if scout else (1,))
    model = offload_moe.load(ckpt, Placement(cache_slots=2, context_length=64), device="cpu", dtype=torch.float32,
                             profile=None)
    assert len(model.generate([1, 2, 3], max_new_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3


def test_quantized_checkpoint_matches_transformers_on_its_dequantized_weights(checkpoint, tmp_path):
    """`offload-moe quantize` writes Llama 4 per expert (int4 experts, int8 attention); its logits equal
    transformers' on the weights it stores, dequantized (the stacked [E, H, 2I] experts rebuilt)."""
    import copy

    from offload_moe.checkpoints.checkpoint import Checkpoint
    from offload_moe.kernels.groupwise import QuantizedWeight
    directory, reference, _ = checkpoint("scout")
    dst = offload_moe.quantize(directory, tmp_path / "q", experts="int4", attention="int8", embeddings="fp32",
                               group_size=8, method="rtn")
    ckpt = Checkpoint(dst)
    assert ckpt.layout == "per_expert"

    def deq(w):
        return w.dequantize(torch.float32) if isinstance(w, QuantizedWeight) else w.float()
    oracle = copy.deepcopy(reference)
    state = oracle.state_dict()   # shares storage with the parameters
    with torch.no_grad():
        for name, shape in ckpt.expected_shapes().items():
            state[name.replace(".mlp.", ".feed_forward.")].copy_(deq(ckpt.get_weight(name, shape)))
        for i in ckpt.config.moe_layers:
            p = f"model.layers.{i}.feed_forward.experts."
            for e in range(ckpt.config.num_experts):
                w = {k: deq(v) for k, v in ckpt.expert(i, e).items()}
                state[p + "gate_up_proj"][e].copy_(torch.cat([w["w1"], w["w3"]]).T)    # [H, 2I]
                state[p + "down_proj"][e].copy_(w["w2"].T)                              # [I, H]
    model = offload_moe.load(dst, Placement(cache_slots=2), device="cpu", dtype="float32")
    assert max_diff(model, oracle) <= 1e-4 and max_diff(model, reference) > 1e-3   # the oracle is not the source
