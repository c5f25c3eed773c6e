"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): RMSNorm on each query and key head before RoPE.

Follows transformers' `Qwen3MoeForCausalLM`. From config.json: `norm_topk_prob`, `head_dim`,
`moe_intermediate_size`, and dense layers from `mlp_only_layers` / `decoder_sparse_step`."""

from .family import Family
from .reader import ConfigReader, common_fields, qwen_dense_layers


def parse(r: ConfigReader) -> dict:
    c = common_fields(r, experts=r.first("num_experts", "num_local_experts"), intermediate="moe_intermediate_size")
    return dict(**c, sliding_window=r.sliding(),
                dense_layers=qwen_dense_layers(r, c["num_layers"]),
                dense_intermediate_size=r.int("intermediate_size"),
                qkv_bias=r.bool("attention_bias", False), o_bias=r.bool("attention_bias", False),
                norm_topk_prob=r.bool("norm_topk_prob", False))


FAMILY = Family(model_type="qwen3_moe", parse=parse, qk_norm="head")
