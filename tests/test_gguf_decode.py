"""A GGUF model's decode on the CPU takes the kernels' fast paths (issue 25): q, k and v of one
input in one ggml kernel call, and fp32 activations by default (the kernels take fp32 or bf16, never
the float16 a quantized token table used to imply). Oracles: the matrices computed one by one, and
the greedy tokens of the same file loaded with an explicit dtype."""

from __future__ import annotations

import pytest
import torch
from gguf_fixtures import T, tiny_mixtral_gguf

import offload_moe
from offload_moe.model.attention import Attention
from offload_moe.kernels.ggml import GGMLGroup

PROMPT = [1, 17, 42, 5, 66, 23, 9, 31]


@pytest.fixture(scope="module")
def q4_file(tmp_path_factory):
    """A tiny Mixtral as a Q4_0 GGUF (q and k rows permuted in the file)."""
    return tiny_mixtral_gguf(tmp_path_factory, "q4.gguf", T.Q4_0)


def _attentions(model) -> list[Attention]:
    return [layer.self_attn for layer in model.transformer.layers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 9])
def test_grouped_q_k_v_equal_the_matrices_one_by_one(q4_file, dtype, tokens):
    model = offload_moe.load(q4_file, device="cpu", dtype="float32")
    for attn in _attentions(model):
        assert isinstance(attn.qkv, GGMLGroup)
        x = torch.randn(1, tokens, 256, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        q, k, v = attn.project(x)
        assert torch.equal(q, attn.q_proj(x)) and torch.equal(k, attn.k_proj(x)) and torch.equal(v, attn.v_proj(x))


def test_greedy_tokens_do_not_depend_on_the_grouped_call(q4_file):
    model = offload_moe.load(q4_file, device="cpu", dtype="float32")
    grouped = model.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
    for attn in _attentions(model):
        attn.qkv = None  # each projection on its own
    assert model.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids == grouped


def test_a_quantized_gguf_computes_in_fp32_on_the_cpu_by_default(q4_file):
    default = offload_moe.load(q4_file, device="cpu")
    assert default.dtype == torch.float32 and default.settings.dtype == "float32"
    explicit = offload_moe.load(q4_file, device="cpu", dtype="float32")
    assert default.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids == \
        explicit.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
    assert offload_moe.load(q4_file, device="cpu", dtype="float16").dtype == torch.float16  # asked for: kept
