"""GGUF files written by llama.cpp's converter from the tiny sigmoid-routed models (issue 27) load and
agree with their safetensors source and with transformers: deepseek2 (DeepSeek-V3 / Kimi-K2 and
GLM-4.7-Flash, told from DeepSeek-V2 by their sigmoid routing), glm4moe, minimax-m2. Skipped unless
$LLAMA_CPP_DIR names a llama.cpp checkout (its converter)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from gguf_fixtures import llamacpp_convert, llamacpp_dir

import offload_moe
from offload_moe.base.runtime import DEMO_DIR
from test_families_sigmoid import SIGMOID_FAMILIES, tiny_sigmoid_model
from offload_moe import Placement

pytestmark = pytest.mark.skipif(llamacpp_dir() is None,
                                reason="llama.cpp not available: set LLAMA_CPP_DIR to a checkout with its converter")

# GLM's vocabulary reader asks the tokenizer for these (GLM-4.5's own special tokens)
GLM_SPECIAL = ("[gMASK]", "<|user|>", "<|endoftext|>", "<|observation|>")
# config.json keys the published checkpoints have and transformers 5 does not write (the converter reads them)
PUBLISHED_KEYS = {"deepseek_v3": {"scoring_func": "sigmoid"}, "minimax_m2": {"scoring_func": "sigmoid"}}
# one case per converter architecture in the default run (~30 s each: the converter); GLM-4.5-Air's shape with -m slow
CASES = ["deepseek_v3", "glm4_moe", pytest.param("glm4_moe_air", marks=pytest.mark.slow), "glm4_moe_lite", "minimax_m2"]


def converted(name: str, tmp_path):
    """(GGUF path, safetensors directory, transformers model): the tiny model with the demo's
    vocabulary plus GLM's special tokens, as llama.cpp's converter writes it (f32)."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in GLM_SPECIAL])
    prefix, overrides = SIGMOID_FAMILIES[name]
    model = tiny_sigmoid_model(name, vocab_size=tokenizer.get_vocab_size())
    d = tmp_path / "hf"
    model.save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | PUBLISHED_KEYS.get(name.split("_air")[0], {})))
    shutil.copy(DEMO_DIR / "tokenizer_config.json", d / "tokenizer_config.json")
    tokenizer.save(str(d / "tokenizer.json"))
    return llamacpp_convert(d, tmp_path / f"{name}.gguf", "f32"), d, model


@pytest.mark.parametrize("name", CASES)
def test_converter_output_agrees_with_the_safetensors_source(name, tmp_path):
    path, source, reference = converted(name, tmp_path)
    ids = torch.tensor([[1, 17, 42, 5, 66, 23, 9, 31, 4000, 7]])
    from_gguf = offload_moe.load(path, Placement(cache_slots=2), device="cpu", dtype="float32")
    from_safetensors = offload_moe.load(source, device="cpu", dtype="float32")
    assert from_gguf.config.model_type == ("deepseek_v3" if name == "glm4_moe_lite" else source_type(source))
    got = from_gguf.logits(ids)
    assert (got - from_safetensors.logits(ids)).abs().max().item() < 1e-4
    with torch.no_grad():
        assert (got - reference(ids).logits).abs().max().item() < 1e-4
    from offload_moe.api.sources import open_checkpoint
    by_kind = open_checkpoint(path).weights_by_kind()   # `info`: the file's weights sorted as the config counts them
    assert {k: p for k, (p, _) in by_kind.items()} == from_gguf.config.params_by_kind()
    prompt = ids[0, :6].tolist()
    assert (from_gguf.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids
            == from_safetensors.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids)


def source_type(directory) -> str:
    return json.loads((directory / "config.json").read_text())["model_type"]
