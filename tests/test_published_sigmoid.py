"""`plan` on the published config.json files of the sigmoid-routed families (issue 27) gives their
published parameter counts.

The files in tests/data are the published config.json of deepseek-ai/DeepSeek-V3,
moonshotai/Kimi-K2-Instruct, zai-org/GLM-4.5, zai-org/GLM-4.5-Air and MiniMaxAI/MiniMax-M2 on the
Hugging Face Hub, written out here from their published values (no hub access in the tests);
glm-4.7-flash-config.json is zai-org/GLM-4.7-Flash's, from the values transformers 5's
`Glm4MoeLiteConfig` takes as its defaults from that model. The multi-token-prediction layers some
of them publish after the last layer are not part of the model and are not counted (DeepSeek's own
671B leaves its 14B out the same way)."""

import json
import math

import pytest

from offload_moe.cli.main import main
from offload_moe.checkpoints.config import ModelConfig
from offload_moe.base.runtime import fmt_count
from test_families import DATA, swiglu
from test_info_plan import table
from offload_moe import Placement


def mla(H, heads, q_rank, kv_rank, nope, rope, v):
    """One latent-attention layer: q_a, its norm, q_b; kv_a (latent + rope key), its norm, kv_b; o."""
    q = H * q_rank + q_rank + q_rank * heads * (nope + rope)
    return q + H * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v) + heads * v * H


def gqa(H, heads, kv_heads, hd, bias, qk_norm):
    """One grouped-query attention layer: q, k, v (biases), o; q/k norms per head or over the projection."""
    n = 2 * H * heads * hd + 2 * H * kv_heads * hd + bias * (heads + 2 * kv_heads) * hd
    return n + {"head": 2 * hd, "full": (heads + kv_heads) * hd, None: 0}[qk_norm]


def counts(L, H, V, attention, dense, dense_I, E, k, I, shared_I):
    """(total, active, embeddings): L layers of which `dense` are dense (width dense_I); E experts of width I
    (top-k) and a shared expert of width shared_I in the others; a router and a selection bias [E] each."""
    moe = L - dense
    shared = (L * attention + dense * swiglu(H, dense_I) + moe * (E * (H + 1) + swiglu(H, shared_I))
              + (2 * L + 1) * H + 2 * V * H)
    return shared + moe * E * swiglu(H, I), shared + moe * k * swiglu(H, I), 2 * V * H


# file -> (total, active, embeddings) from each term of the published config, and the published figures
# (total, active, whether the vendor's active figure counts the embeddings and output head)
PUBLISHED = {
    "deepseek-v3": (counts(61, 7168, 129280, mla(7168, 128, 1536, 512, 128, 64, 128), 3, 18432, 256, 8, 2048, 2048),
                    (671e9, 37e9, True)),
    "kimi-k2-instruct": (counts(61, 7168, 163840, mla(7168, 64, 1536, 512, 128, 64, 128), 1, 18432, 384, 8, 2048,
                                2048), (1.0e12, 32e9, True)),
    "glm-4.5": (counts(92, 5120, 151552, gqa(5120, 96, 8, 128, True, "head"), 3, 12288, 160, 8, 1536, 1536),
                (355e9, 32e9, False)),
    "glm-4.5-air": (counts(46, 4096, 151552, gqa(4096, 96, 8, 128, True, None), 1, 10944, 128, 8, 1408, 1408),
                    (106e9, 12e9, False)),
    "glm-4.7-flash": (counts(47, 2048, 154880, mla(2048, 20, 768, 512, 192, 64, 256), 1, 10240, 64, 4, 1536, 1536),
                      (30e9, 3e9, False)),
    # no shared expert, no dense layer: the counts' shared-expert term is zero-width
    "minimax-m2": (counts(62, 3072, 200064, gqa(3072, 48, 8, 128, False, "full"), 0, 0, 256, 8, 1536, 0),
                   (230e9, 10e9, False)),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_counts_every_term(name):
    config = ModelConfig.load(DATA / f"{name}-config.json")
    (total, active, _), _ = PUBLISHED[name]
    assert (config.total_params, config.active_params) == (total, active)


@pytest.mark.parametrize("name", PUBLISHED)
def test_counts_are_the_published_sizes(name):
    """Within 3% of the vendors' round figures (GLM-4.5's "355B" is 352.8B without its MTP layer;
    MiniMax-M2's "10B active" 9.8B; Kimi-K2's "32B active" 32.9B), as each vendor counts active ones;
    GLM-4.7-Flash's "A3B" is a name with one significant figure (3.26B: 10%, as Qwen3-30B-A3B's 3.3B)."""
    config = ModelConfig.load(DATA / f"{name}-config.json")
    (_, _, embeddings), (total, active, with_embeddings) = PUBLISHED[name]
    ours = config.active_params - (0 if with_embeddings else embeddings)
    assert math.isclose(config.total_params, total, rel_tol=0.03)
    assert math.isclose(ours, active, rel_tol=0.1 if name == "glm-4.7-flash" else 0.03)


@pytest.mark.parametrize("name", PUBLISHED)
def test_plan_shows_the_counts(name, tmp_path, capsys):
    """`offload-moe plan config.json` under a CPU profile with room for the largest (4 TB of RAM). The FP8
    files' quantization_config is left out here: reading FP8 blocks is the pre-quantized formats' part."""
    raw = json.loads((DATA / f"{name}-config.json").read_text())
    raw.pop("quantization_config", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    profile = tmp_path / "huge.toml"
    profile.write_text('device = "cpu"\nvram_budget = 0\nreserve = "2GB"\ncontext_length = 4096\n'
                       'offload = "ram"\nram_budget = "4TB"\n[bits]\nexperts = "int4"\nattention = "int8"\n'
                       'embeddings = "bf16"\n')
    rows = table(capsys, "plan", tmp_path / "config.json", "--profile", profile)
    config = ModelConfig.load(DATA / f"{name}-config.json")
    assert rows["parameters"] == (f"{fmt_count(config.total_params)} total, "
                                  f"{fmt_count(config.active_params)} active per token")
    assert rows["model"].startswith(raw["model_type"])


SYNTHETIC = {"deepseek-v3": "deepseek-v3", "kimi-k2": "kimi-k2-instruct", "glm-4.5": "glm-4.5",
             "glm-4.5-air": "glm-4.5-air", "glm-4.7-flash": "glm-4.7-flash", "minimax-m2": "minimax-m2"}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_shapes_are_the_published_ones_and_run(name):
    """`synthetic` has each family's real sizes (the published file's counts), and a scaled-down one decodes."""
    import torch

    import offload_moe
    from offload_moe.checkpoints.synthetic import SyntheticCheckpoint, synthetic_config
    published = ModelConfig.load(DATA / f"{SYNTHETIC[name]}-config.json")
    assert synthetic_config(name).total_params == published.total_params
    config = synthetic_config(name)
    ckpt = SyntheticCheckpoint(name, layers=len(config.dense_layers) + 1, scale=0.02)  # one MoE layer
    model = offload_moe.load(ckpt, Placement(cache_slots=2, context_length=64), device="cpu", dtype=torch.float32,
                             profile=None)
    assert len(model.generate([1, 2, 3], max_new_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3
