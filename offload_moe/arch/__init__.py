"""Architecture adapters: one small module per MoE family, each a `Family` table.

The model, checkpoint reader and expert engine are shared; a family only names its tensors and
switches a few model options (`family.Family`). How its `config.json` maps onto `ModelConfig` is
its parser in `config._PARSERS`.
"""

from __future__ import annotations

from . import deepseek_v2, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
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
                               for m in (mixtral, qwen3_moe, olmoe, qwen2_moe, deepseek_v2, gpt_oss)}


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
