"""Architecture adapters: one file per MoE family, each a `Family` table with its config parser.

The model, checkpoint reader and expert engine are shared; a family only names its tensors,
switches a few model options (`family.Family`), and says how its `config.json` maps onto
`ModelConfig` (its `parse`, built from `reader`). Adding a family is one new file here plus its
line in `FAMILIES` (docs/architecture.md).
"""

from __future__ import annotations

from . import deepseek_v2, gpt_oss, llama4, mixtral, olmoe, qwen2_moe, qwen3_moe
from .family import (
    Family,
    attention_shapes,
    dense_shapes,
    expert_names,
    expert_shapes,
    param_name,
    router_name,
)

FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY
                               for m in (mixtral, qwen3_moe, olmoe, qwen2_moe, deepseek_v2, gpt_oss, llama4)}
FAMILIES[llama4.MULTIMODAL.model_type] = llama4.MULTIMODAL  # Llama 4 with its vision tower: the text part


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
    "param_name",
    "router_name",
]
