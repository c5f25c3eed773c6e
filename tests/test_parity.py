"""Our model against transformers' MixtralForCausalLM on tiny random checkpoints (fp32)."""

import pytest
import torch

import offload_moe
from conftest import TINY_CONFIGS

CASES = [(name, layout) for name in TINY_CONFIGS for layout in ("per_expert", "fused")]


@pytest.mark.parametrize("name,layout", CASES)
def test_logits_match_transformers(tiny_checkpoints, name, layout):
    directory, reference = tiny_checkpoints[(name, layout)]
    model = offload_moe.load(directory, device="cpu")
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (model.logits(ids) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name,layout", CASES)
def test_greedy_tokens_match_transformers(tiny_checkpoints, name, layout):
    directory, reference = tiny_checkpoints[(name, layout)]
    model = offload_moe.load(directory, device="cpu")
    prompt = [1, 17, 42, 5, 66, 23]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                      min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    ours = model.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True)
    assert ours.token_ids == expected[0, len(prompt):].tolist()
