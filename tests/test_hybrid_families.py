"""The hybrid linear-attention families (Qwen3-Next, Qwen3.5-MoE) beyond test_families: several seeds
over sequences that cross the DeltaNet's 64-token chunks, a prompt prefilled in pieces against one
pass, the recurrent state through prefix reuse and continuous batching, and the chunked delta rule
against the token-by-token one in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import offload_moe
from offload_moe.generation.batch import DecodeBatch
from offload_moe.generation.generate import DecodeTiming, Sampling
from offload_moe.model.kv_slots import KVSlots
from offload_moe.model.linear_attention import chunked_delta_rule, l2norm, recurrent_delta_rule
from test_families import PROMPT, greedy_tokens, tiny_model
from offload_moe import Placement

DATA = Path(__file__).parent / "data"
HYBRID = ["qwen3_next", "qwen3_5_moe"]
MODES = {"resident": {}, "offloaded": {"cache_slots": 2}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(family, seed) -> (directory, transformers model), built once."""
    made = {}

    def get(name: str, seed: int):
        if (name, seed) not in made:
            model = tiny_model(name, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            made[(name, seed)] = d, model
        return made[(name, seed)]
    return get


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", HYBRID)
def test_seeds_over_several_delta_chunks_match_transformers(saved, name, seed, mode):
    """120 tokens: two of the chunked form's 64-token chunks, the second from the state the first left."""
    directory, reference = saved(name, seed)
    model = offload_moe.load(directory, Placement(**MODES[mode]), device="cpu")
    x = ids(2, 120, seed)
    with torch.no_grad():
        expected = reference(x).logits
    assert (model.logits(x) - expected).abs().max().item() <= 1e-4
    assert model.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == \
        greedy_tokens(reference)


@pytest.mark.parametrize("name", HYBRID)
def test_prefill_in_pieces_matches_transformers_in_pieces(saved, name):
    """A 120-token prompt fed in pieces of 37 through the cache (the pieces end inside the DeltaNet's
    64-token chunks and past them; the full-attention layers read their KV cache): every position's
    logits within 1e-4 of transformers fed the same pieces through its cache, and the same argmax as one
    pass. (These random models amplify fp32 rounding: transformers' own pieces differ from its one pass
    by up to ~1e-3 on some seeds, so pieces against one pass is checked exactly, in float64, below.)"""
    from transformers import DynamicCache

    directory, reference = saved(name, 1)
    model = offload_moe.load(directory, device="cpu")
    x = ids(1, 120)
    cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        expected = torch.cat([reference(x[:, s:s + 37], cache=cache, use_cache=True).logits[0]
                              for s in range(0, 120, 37)])              # (120, V)
    pieces = torch.cat([model.transformer(x[:, s:s + 37], start=s, slot=0)[0] for s in range(0, 120, 37)])
    assert (pieces - expected).abs().max().item() <= 1e-4
    assert pieces.argmax(-1).tolist() == model.logits(x)[0].argmax(-1).tolist()


@pytest.mark.parametrize("name", HYBRID)
def test_deltanet_layer_in_pieces_equals_one_pass_in_float64(saved, name):
    """One Gated DeltaNet layer in float64: pieces of 1, 5 and 37 tokens through its `RecurrentState`
    (convolution inputs and delta-rule state carried over) give the one pass's output."""
    from offload_moe.checkpoints.config import ModelConfig
    from offload_moe.model.linear_attention import GatedDeltaNet, RecurrentState

    directory, reference = saved(name, 1)
    cfg = ModelConfig.load(directory)
    layer = GatedDeltaNet(cfg).double()
    layer.load_state_dict({k: v.double() for k, v in reference.model.layers[0].linear_attn.state_dict().items()})
    x = torch.randn(1, 90, cfg.hidden_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        whole = layer(x, None, None, None, None, 0)                   # (1, 90, H)
        for piece in (1, 5, 37):
            state = RecurrentState(1, cfg, "cpu", torch.float64)
            out = torch.cat([layer(x[:, s:s + piece], None, None, None, state, s) for s in range(0, 90, piece)], dim=1)
            torch.testing.assert_close(out, whole, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", HYBRID)
def test_prefix_reuse_continues_the_state_or_starts_over(saved, name):
    """A prompt that extends everything a slot holds continues from its state; one that shares only part
    of it cannot (a recurrent state is not cut back) and is prefilled from position 0. Both give the
    tokens of a fresh cache."""
    directory, _ = saved(name, 1)
    model = offload_moe.load(directory, device="cpu")
    first = model.generate(PROMPT, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    cases = {"extends": (PROMPT + first + [7, 8], len(PROMPT) + 5), "diverges": (PROMPT[:3] + [9, 9, 9], 0)}
    for prompt, reused in cases.values():
        got = model.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
        assert model.stats["generation"]["reused_tokens"] == reused
        model.transformer.kv_slots.clear()
        assert model.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids == got


@pytest.mark.parametrize("name", HYBRID)
def test_decode_batch_equals_solo_runs(saved, name):
    """Three sequences through two slots (one waits), prompts prefilled 4 tokens at a time between
    batched decode steps: each row's DeltaNet state is its own."""
    directory, _ = saved(name, 2)
    model = offload_moe.load(directory, device="cpu")
    prompts, lengths = [PROMPT, [1, 50, 51, 52, 53, 54, 55, 56, 57], [1, 9]], [10, 7, 12]
    solo = []
    for p, n in zip(prompts, lengths):
        model.transformer.kv_slots.clear()
        solo.append(model.generate(p, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids)
    model.transformer.set_slots(2)
    batch = DecodeBatch(model.transformer, prefill_chunk=4)
    waiting, got, together = list(range(3)), {i: [] for i in range(3)}, 0
    while waiting or batch.sequences:
        while waiting and not batch.full:
            i = waiting.pop(0)
            batch.add(prompts[i], lengths[i], Sampling(temperature=0), DecodeTiming(), owner=i)
        produced = batch.step()
        together += len(produced) > 1
        for seq, token in produced:
            got[seq.owner].append(token)
            if seq.finished:
                batch.remove(seq)
    assert [got[i] for i in range(3)] == solo
    assert together > 3


def test_a_slot_whose_state_a_failed_pass_touched_is_not_reused():
    slots = KVSlots([], recurrent=True)
    slots.ids[0] = [1, 2, 3]
    assert slots.claim([1, 2, 3, 4])[2] == 3
    slots.release(0, slots.lease[0])
    slots.stale.add(0)                     # a forward pass raised while writing slot 0
    assert slots.claim([1, 2, 3, 4])[2] == 0


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunked_delta_rule_equals_the_recurrence_in_float64(chunk):
    """From a nonzero state, over 37 tokens (a partial last chunk), 3 heads of (5, 7)."""
    g = torch.Generator().manual_seed(0)
    B, nv, T, dk, dv = 2, 3, 37, 5, 7
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)   # noqa: E731
    q, k = l2norm(rand(B, nv, T, dk)) * dk ** -0.5, l2norm(rand(B, nv, T, dk))
    v, state = rand(B, nv, T, dv), rand(B, nv, dk, dv)
    decay = -torch.rand(B, nv, T, generator=g, dtype=torch.float64) * 2
    beta = torch.rand(B, nv, T, generator=g, dtype=torch.float64)
    out, final = chunked_delta_rule(q, k, v, decay, beta, state, chunk)
    expected_out, expected_final = recurrent_delta_rule(q, k, v, decay, beta, state)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=1e-12)


def test_qwen3_5_multimodal_checkpoint_reads_its_language_model(tmp_path):
    """Qwen3.5 is published as `Qwen3_5MoeForConditionalGeneration` (model_type qwen3_5_moe, the text
    keys under text_config, tensors under model.language_model.*, a vision encoder beside): its text
    logits equal transformers' for the whole model on text."""
    import transformers

    from test_families import BASE, FAMILIES
    text = {**BASE, **FAMILIES["qwen3_5_moe"][1]}
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=4,
                  num_position_embeddings=16)
    torch.manual_seed(0)
    reference = transformers.Qwen3_5MoeForConditionalGeneration(
        transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        for pname, p in reference.named_parameters():
            p.normal_(1 if pname.endswith("norm.weight") else 0, 0.1 if pname.endswith("norm.weight") else 0.2)
    reference.save_pretrained(tmp_path)
    model = offload_moe.load(tmp_path, Placement(cache_slots=2), device="cpu")
    x = ids(2, 20)
    with torch.no_grad():
        expected = reference(input_ids=x).logits
    assert model.config.model_type == "qwen3_5_moe"
    assert (model.logits(x) - expected).abs().max().item() <= 1e-4


# ---- the published configs (tests/data, written from the config.json files published with
# Qwen/Qwen3-Next-80B-A3B-Instruct and Qwen/Qwen3.5-35B-A3B on the Hugging Face Hub; transformers'
# Qwen3_5MoeTextConfig defaults are documented as that checkpoint's and agree) ----
PUBLISHED = {  # file -> (transformers' classes for the language model, advertised total and active, billions)
    "qwen3-next-80b-a3b": (("Qwen3NextConfig", "Qwen3NextForCausalLM"), 80, 3),
    "qwen3.5-35b-a3b": (("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"), 35, 3),
}


def published_raw(name: str) -> dict:
    import json

    return json.loads((DATA / f"{name}-config.json").read_text())


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_counts_every_parameter_transformers_builds(name):
    """Our count of the language model equals transformers' model built from the same config.json (on
    the meta device), and rounds to the advertised size; "A3B": 3.x billion active per token."""
    import transformers

    from offload_moe.checkpoints.config import ModelConfig
    (config_class, model_class), total, active = PUBLISHED[name]
    raw = published_raw(name)
    raw = raw.get("text_config", raw)
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version", "torch_dtype", "dtype")}
    if "rope_parameters" not in raw:  # transformers >= 5 nests these
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw.pop("rope_theta"),
                                  "partial_rotary_factor": raw.pop("partial_rotary_factor")}
        raw.pop("rope_scaling", None), raw.pop("use_sliding_window", None)
    with torch.device("meta"):
        reference = getattr(transformers, model_class)(getattr(transformers, config_class)(**raw))
    config = ModelConfig.load(DATA / f"{name}-config.json")
    assert config.total_params == sum(p.numel() for p in reference.parameters())
    assert round(config.total_params / 1e9) == total and int(config.active_params / 1e9) == active


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_plans_with_the_recurrent_state(name):
    from offload_moe.checkpoints.config import ModelConfig
    from offload_moe.placement.planner import plan
    from offload_moe.placement.profiles import load_profile
    config = ModelConfig.load(DATA / f"{name}-config.json")
    la = config.linear_attention
    linear_layers = config.num_layers - len(config.attention_layers)
    assert linear_layers == 3 * config.num_layers // 4
    # per linear layer: conv inputs (3 x 2048 channels x 3 positions, 16-bit) and 32 states of 128 x 128 (fp32)
    assert config.recurrent_state_bytes(2) == linear_layers * (2 * 8192 * 3 + 4 * 32 * 128 * 128)
    assert (la.conv_dim, la.num_value_heads, la.key_head_dim) == (8192, 32, 128)
    for profile in ("8gb", "12gb"):
        p = plan(config, load_profile(profile), ram_available=64 * 10**9)
        assert config.top_k <= p.slots_per_layer <= config.num_experts
        assert p.vram_bytes <= load_profile(profile).vram_budget
        assert p.state_bytes == config.recurrent_state_bytes(2)
        assert p.kv_bytes == p.kv_tokens * config.kv_cache_bytes_per_token(2) + p.state_bytes


@pytest.mark.parametrize("name", PUBLISHED)
def test_synthetic_hybrid_model_has_the_published_shapes_and_runs(name):
    """`synthetic` at full size counts what the published config does; scaled down (3 DeltaNet layers and
    a full-attention one, widths x0.05) it loads through the offloading engine and generates."""
    from offload_moe.checkpoints.config import ModelConfig
    from offload_moe.checkpoints.synthetic import SyntheticCheckpoint, synthetic_config
    assert synthetic_config(name).total_params == ModelConfig.load(DATA / f"{name}-config.json").total_params
    ckpt = SyntheticCheckpoint(name, layers=4, scale=0.05)
    assert ckpt.config.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    model = offload_moe.load(ckpt, Placement(cache_slots=2, context_length=64), device="cpu", dtype=torch.float32,
                             profile=None)
    assert len(model.generate([1, 2, 3], max_new_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3


@pytest.mark.skipif(__import__("gguf_fixtures").llamacpp_dir() is None,
                    reason="llama.cpp's converter not available: set LLAMA_CPP_DIR to a llama.cpp checkout")
@pytest.mark.parametrize("name", HYBRID)
def test_gguf_from_llama_cpps_converter_matches_transformers(name, tmp_path):
    """$LLAMA_CPP_DIR/convert_hf_to_gguf.py (conversion/qwen.py: qwen3next, qwen35moe; --no-mtp) on the tiny
    models: norms stored + 1, A as -exp(A_log), inputs split, Qwen3.5's value heads reordered. Resident
    (computed where the file lies) and through the offloading engine."""
    from test_gguf_llamacpp import _converted

    path, reference = _converted(name, tmp_path)
    x = ids(2, 80)
    with torch.no_grad():
        expected = reference(x).logits
    for mode in MODES.values():
        got = offload_moe.load(path, Placement(**mode), device="cpu", dtype="float32").logits(x)
        assert (got - expected).abs().max().item() <= 1e-4
    from offload_moe.api.sources import open_checkpoint
    ckpt = open_checkpoint(path)  # `info`: llama.cpp's tensors sorted by kind as the config counts them
    assert {k: p for k, (p, _) in ckpt.weights_by_kind().items()} == ckpt.config.params_by_kind()


def with_mtp_block(path: Path, out: Path) -> Path:
    """The converted file as the converter writes a checkpoint with its multi-token-prediction layer: one
    more block (here a copy of the last layer's tensors, with nextn's eh_proj), `nextn_predict_layers` = 1."""
    import gguf
    import numpy as np

    src = gguf.GGUFReader(path)
    arch = src.fields["general.architecture"].contents()
    layers = src.fields[f"{arch}.block_count"].contents()
    w = gguf.GGUFWriter(str(out), arch)
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == f"{arch}.block_count":
            value += 1
        elif key == f"{arch}.attention.recurrent_layers":
            value = value + [False]
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, field.types[0])
    w.add_uint32(f"{arch}.nextn_predict_layers", 1)
    last = f"blk.{layers - 1}."
    for t in src.tensors:
        data = np.array(t.data).reshape(tuple(reversed(t.shape.tolist())))
        w.add_tensor(t.name, data)
        if t.name.startswith(last):
            w.add_tensor(f"blk.{layers}." + t.name.removeprefix(last), data)
    hidden = src.fields[f"{arch}.embedding_length"].contents()
    w.add_tensor(f"blk.{layers}.nextn.eh_proj.weight", np.ones((hidden, 2 * hidden), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.skipif(__import__("gguf_fixtures").llamacpp_dir() is None,
                    reason="llama.cpp's converter not available: set LLAMA_CPP_DIR to a llama.cpp checkout")
def test_gguf_with_a_multi_token_prediction_block_runs_the_model_layers_only(tmp_path):
    from test_gguf_llamacpp import _converted

    path, _ = _converted("qwen3_5_moe", tmp_path)
    mtp = with_mtp_block(path, tmp_path / "mtp.gguf")
    a, b = (offload_moe.load(p, device="cpu", dtype="float32") for p in (path, mtp))
    assert b.config.num_layers == a.config.num_layers == 3
    x = ids(1, 12)
    assert torch.equal(a.logits(x), b.logits(x))


QWEN3_NEXT_TINY = dict(model_type="qwen3_next", vocab_size=96, hidden_size=32, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=24,
                       intermediate_size=40, num_experts=7, num_experts_per_tok=2, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=10, linear_value_head_dim=6)


@pytest.mark.parametrize("key,value", [
    ("linear_num_value_heads", 5),                                  # not a multiple of the key heads
    ("linear_conv_kernel_dim", 1),
    ("layer_types", ["linear_attention"] * 4),                      # no full-attention layer
    ("layer_types", ["linear_attention", "sliding", "linear_attention", "full_attention"]),
    ("partial_rotary_factor", 0.3125),                              # 16 x 0.3125: 5 rotated dims, an odd number
    ("partial_rotary_factor", 2),
    ("text_config", 3),
])
def test_bad_hybrid_config_is_one_line_naming_the_key(key, value):
    from offload_moe import OffloadMoeError
    from offload_moe.checkpoints.config import ModelConfig
    raw = QWEN3_NEXT_TINY | {key: value} | ({"model_type": "qwen3_5_moe"} if key == "text_config" else {})
    with pytest.raises(OffloadMoeError) as e:
        ModelConfig.from_dict(raw)
    assert "\n" not in str(e.value) and repr(key) in str(e.value)
