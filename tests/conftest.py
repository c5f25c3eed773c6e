"""Shared fixtures: tiny random Mixtral checkpoints written by transformers (the oracle)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _load_keeps_the_tests_threads():
    """load() sets torch's threads, by default to `default_threads()`, which follows the machine's load
    average: two models loaded moments apart could compute with different counts (and different
    rounding). In tests "auto" means the 2 threads set above; test_constrain checks the real default."""
    import offload_moe.api.loader
    from offload_moe.base.threads import set_threads

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(offload_moe.api.loader, "set_threads", lambda threads: set_threads(2 if threads == "auto" else threads))
        yield


def randomised(model, biases: bool = True):
    """A transformers model's weights drawn as the family tests draw them (matrices N(0, 0.2), norm
    weights N(1, 0.1), with `biases` the other vectors N(0, 0.2)), in place; returns it in eval mode."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif pname.endswith("norm.weight"):
                p.normal_(1, 0.1)
            elif biases:
                p.normal_(0, 0.2)
    return model.eval()


# Configurations the acceptance list names: one KV head, top-1/2/3, 16 experts, a sliding window
# shorter than the test sequence, tied embeddings.
TINY_CONFIGS = {
    "base": dict(),
    "kv1_top1": dict(num_key_value_heads=1, num_experts_per_tok=1),
    "top3_e16": dict(num_experts_per_tok=3, num_local_experts=16),
    "window": dict(sliding_window=7),
    "tied": dict(tie_word_embeddings=True),
}


def tiny_mixtral(seed: int = 0, **overrides):
    """A random fp32 MixtralForCausalLM with a few layers; weights scaled up so routing is decisive."""
    from transformers import MixtralConfig, MixtralForCausalLM

    args = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                max_position_embeddings=128, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    args.update(overrides)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def save(model, directory, fused: bool = False):
    model.save_pretrained(directory, max_shard_size="40KB", save_original_format=not fused)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{(config name, layout): (directory, transformers model)} for every tiny config and both layouts."""
    out = {}
    for name, overrides in TINY_CONFIGS.items():
        model = tiny_mixtral(**overrides)
        for layout in ("per_expert", "fused"):
            d = tmp_path_factory.mktemp(f"{name}-{layout}")
            out[(name, layout)] = (save(model, d, fused=layout == "fused"), model)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints):
    """The base config, per-expert layout: (directory, transformers model)."""
    return tiny_checkpoints[("base", "per_expert")]
