"""GGUF in (issue 18) against llama.cpp itself: its converter, `llama-quantize`, `llama-simple`
(greedy) and `llama-tokenize`. Skipped unless $LLAMA_CPP_DIR names a llama.cpp checkout whose
build/bin holds those binaries (see BENCHMARKS.md, "GGUF in")."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from gguf_fixtures import llamacpp_bin, llamacpp_convert, llamacpp_dir
from test_gguf import MIXED_TEXT

import offload_moe
from offload_moe.checkpoints.gguf import GGUFCheckpoint
from offload_moe.base.runtime import DEMO_DIR
from offload_moe.api.sources import open_tokenizer
from offload_moe import Placement

pytestmark = pytest.mark.skipif(
    llamacpp_dir() is None or not all(llamacpp_bin(b) for b in ("llama-quantize", "llama-simple", "llama-tokenize")),
    reason="llama.cpp not available: set LLAMA_CPP_DIR to a checkout with build/bin/llama-{quantize,simple,tokenize}")

PROMPT = "ROMEO: What light through yonder window"
FORMATS = ["F32", "Q8_0", "Q4_0", "Q4_K_M"]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamacpp")
    f32 = llamacpp_convert(DEMO_DIR, d / "demo-F32.gguf", "f32")
    files = {"F32": f32}
    for q in FORMATS[1:]:
        files[q] = d / f"demo-{q}.gguf"
        subprocess.run([str(llamacpp_bin("llama-quantize")), str(f32), str(files[q]), q, "2"], check=True,
                       capture_output=True)
    return files


def llama_greedy(path, n: int) -> str:
    out = subprocess.run([str(llamacpp_bin("llama-simple")), "-m", str(path), "-n", str(n), PROMPT],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return out.split(PROMPT, 1)[1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_text_equals_llama_cpp(demo_files, fmt):
    # The dequantize-and-multiply path in fp32: on the CPU, cpu_experts="auto" computes packed
    # experts with torch's int4 kernel in bf16, which flips a near-tie (margin 0.015) at token 25
    # of Q4_K_M (BENCHMARKS.md, "GGUF in").
    model = offload_moe.load(demo_files[fmt], Placement(cpu_experts="none"), device="cpu", dtype="float32")
    ours = model.generate(PROMPT, max_new_tokens=32, temperature=0).text
    theirs = llama_greedy(demo_files[fmt], 32)
    assert ours == theirs[:len(ours)] and len(ours) > 20, (ours, theirs)


def test_formats_stay_packed(demo_files):
    """Q4_K_M on the demo's 160/320-wide rows falls back to Q5_0 / Q5_1 / Q8_0 (not multiples of 256)."""
    ckpt = GGUFCheckpoint(demo_files["Q4_K_M"])
    w = ckpt.expert(0, 0)
    assert all(not isinstance(w[k], torch.Tensor) for k in ("w1", "w3", "w2"))


@pytest.mark.parametrize("fmt", ["F32", "Q4_K_M"])
def test_tokenization_equals_llama_tokenize(demo_files, fmt):
    out = subprocess.run([str(llamacpp_bin("llama-tokenize")), "-m", str(demo_files[fmt]), "-p", MIXED_TEXT,
                          "--ids", "--log-disable"], capture_output=True, text=True, timeout=120, check=True).stdout
    theirs = [int(i) for i in re.findall(r"\d+", out.strip().splitlines()[-1])]
    ours = open_tokenizer(GGUFCheckpoint(demo_files[fmt])).encode(MIXED_TEXT)
    assert len(MIXED_TEXT) > 300 and ours == theirs


# What llama.cpp's converter writes for each family, from tiny transformers models (vocabulary: the
# demo's tokenizer, which the converter needs). Configs the converter carries over unchanged: it has
# no dense layers for qwen*moe, drops OLMoE's clip_qkv, and llama.cpp fixes gpt-oss's SwiGLU clamp at 7.
CONVERTER_FIXES = {"qwen3_moe": dict(mlp_only_layers=[]), "qwen2_moe": dict(decoder_sparse_step=1),
                   "olmoe": dict(clip_qkv=None), "deepseek_v2": {}, "deepseek_v2_group": {},
                   "gpt_oss": dict(swiglu_limit=7.0, rope_parameters=dict(
                       rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                       original_max_position_embeddings=32)),
                   # hybrid: no dense layer, top-k renormalised (llama.cpp always does); Qwen3.5 with 2 key
                   # heads to 4 value heads, which the converter reorders (tiled for ggml) and the reader puts back
                   "qwen3_next": dict(mlp_only_layers=[], norm_topk_prob=True),
                   "qwen3_5_moe": dict(linear_num_key_heads=2, linear_num_value_heads=4)}


def _converted(name, tmp_path):
    import shutil

    import transformers
    from test_families import BASE, FAMILIES

    prefix, overrides = FAMILIES[name]
    config = getattr(transformers, f"{prefix}Config")(**{**BASE, **overrides, "vocab_size": 4096,
                                                         **CONVERTER_FIXES[name]})
    torch.manual_seed(0)
    model_class = getattr(transformers, f"{prefix}ForCausalLM", None) or \
        getattr(transformers, f"{prefix.removesuffix('Text')}ForCausalLM")
    model = model_class(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1, 0.1) if pname.endswith("norm.weight") else p.normal_(0, 0.2)
    d = tmp_path / "hf"
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / f, d / f)
    hybrid = ("--no-mtp",) if name in ("qwen3_next", "qwen3_5_moe") else ()  # no multi-token-prediction layer here
    return llamacpp_convert(d, tmp_path / f"{name}.gguf", "f32", *hybrid), model


@pytest.mark.parametrize("name", list(CONVERTER_FIXES))
def test_every_family_as_the_converter_writes_it_matches_transformers(name, tmp_path):
    path, model = _converted(name, tmp_path)
    ids = torch.tensor([[1, 17, 42, 5, 66, 23, 9, 31]])
    with torch.no_grad():
        expected = model(ids).logits
    got = offload_moe.load(path, device="cpu", dtype="float32").logits(ids)
    assert (got - expected).abs().max().item() < 1e-4


def test_gpt_oss_mxfp4_from_llama_quantize_stays_packed_and_exact(tmp_path):
    import gguf
    import numpy as np
    from test_gguf import _dequantized_twin

    path, _ = _converted("gpt_oss", tmp_path)
    q = tmp_path / "gpt-oss-MXFP4.gguf"
    subprocess.run([str(llamacpp_bin("llama-quantize")), str(path), str(q), "MXFP4_MOE", "2"], check=True,
                   capture_output=True)
    ckpt = GGUFCheckpoint(q)
    t = ckpt.tensors["blk.1.ffn_gate_exps.weight"]
    assert t.type == gguf.GGMLQuantizationType.MXFP4
    w1 = ckpt.expert(1, 4)["w1"]
    assert type(w1).__name__ == "MXFP4Weight"
    assert np.array_equal(w1.dequantize().numpy(), gguf.quants.dequantize(np.array(t.data), t.type)[4])
    ids = torch.tensor([[1, 17, 42, 5, 66, 23, 9, 31]])
    twin = _dequantized_twin(q, tmp_path / "twin.gguf")
    a = offload_moe.load(q, Placement(cpu_experts="none"), device="cpu", dtype="float32").logits(ids)
    b = offload_moe.load(twin, Placement(cpu_experts="none"), device="cpu", dtype="float32").logits(ids)
    assert (a - b).abs().max().item() < 1e-4


def test_sentencepiece_vocabulary_tokenizes_as_llama_tokenize(tmp_path):
    from gguf_fixtures import gguf_tokenizer, write_spm_vocab

    corpus = MIXED_TEXT + " the quick brown fox jumps over the lazy dog, and the window breaks; what light is this"
    path = write_spm_vocab(tmp_path / "spm.gguf", corpus)
    out = subprocess.run([str(llamacpp_bin("llama-tokenize")), "-m", str(path), "-p", MIXED_TEXT, "--ids",
                          "--log-disable"], capture_output=True, text=True, timeout=120, check=True).stdout
    theirs = [int(i) for i in re.findall(r"\d+", out.strip().splitlines()[-1])]
    assert gguf_tokenizer(path).encode(MIXED_TEXT) == theirs
