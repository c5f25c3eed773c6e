"""Architecture adapters: one file per MoE family, each a `Family` table with its config parser.

The model, checkpoint reader and expert engine are shared; a family only names its tensors,
switches a few model options (`family.Family`), and says how its `config.json` maps onto
`ModelConfig` (its `parse`, built from `reader`). Adding a family is one new file here plus its
line in `FAMILIES` (docs/architecture.md).
"""

from __future__ import annotations

from . import deepseek_v2, deepseek_v3, glm4_moe, glm4_moe_lite, gpt_oss, llama4, minimax_m2, mixtral, olmoe, qwen2_moe, qwen3_5_moe, qwen3_moe, qwen3_next
from .family import Family, attention_shapes, dense_shapes, expert_names, expert_shapes, mixer_shapes, param_name, router_name

FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY
                               for m in (mixtral, qwen3_moe, olmoe, qwen2_moe, deepseek_v2, gpt_oss, qwen3_next,
                                         qwen3_5_moe, llama4)}
FAMILIES[qwen3_5_moe.TEXT_FAMILY.model_type] = qwen3_5_moe.TEXT_FAMILY
FAMILIES[llama4.MULTIMODAL.model_type] = llama4.MULTIMODAL  # Llama 4 with its vision tower: the text part
# the sigmoid-routed families (issue 27); Kimi-K2's config.json names DeepSeek-V3's code `kimi_k2`
FAMILIES |= {f.model_type: f for f in (deepseek_v3.FAMILY, deepseek_v3.KIMI_K2, glm4_moe.FAMILY,
                                       glm4_moe_lite.FAMILY, minimax_m2.FAMILY)}


def family_of(model_type: str) -> Family:
    return FAMILIES[model_type]


__all__ = [
    "FAMILIES",
    "Family",
    "attention_shapes",
    "dense_shapes",
    "expert_names",
    "expert_shapes",
    "family_of",
    "mixer_shapes",
    "param_name",
    "router_name",
]
