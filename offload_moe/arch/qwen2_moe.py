"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): q/k/v biases and a shared expert beside the
routed ones, its output scaled by sigmoid(x · shared_expert_gate); it stays on the device.

Follows transformers' `Qwen2MoeForCausalLM`."""

from .family import Family

FAMILY = Family(model_type="qwen2_moe", shared_expert_gate=True)
