"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): RMSNorm on each query and key head before RoPE.

Follows transformers' `Qwen3MoeForCausalLM`. From config.json: `norm_topk_prob`, `head_dim`,
`moe_intermediate_size`, and dense layers from `mlp_only_layers` / `decoder_sparse_step`."""

from .family import Family

FAMILY = Family(model_type="qwen3_moe", qk_norm="head")
