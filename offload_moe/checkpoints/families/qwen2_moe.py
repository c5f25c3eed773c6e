"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): q/k/v biases and a shared expert beside the
routed ones, its output scaled by sigmoid(x · shared_expert_gate); it stays on the device.

Follows transformers' `Qwen2MoeForCausalLM`."""

from .family import Family
from .reader import ConfigReader, common_fields, layer_types, qwen_dense_layers


def parse(r: ConfigReader) -> dict:
    c = common_fields(r, experts=r.first("num_experts", "num_local_experts"), intermediate="moe_intermediate_size")
    L = c["num_layers"]
    window, types = r.sliding(), ()
    if window is not None:  # transformers' rule when config.json has no layer_types
        types = r.raw.get("layer_types") or ["sliding_attention" if (i + 1) % 2 and i < r.int("max_window_layers", 28)
                                             else "full_attention" for i in range(L)]
    return dict(**c, sliding_window=window, layer_types=layer_types(r, types, L),
                dense_layers=qwen_dense_layers(r, L), dense_intermediate_size=r.int("intermediate_size"),
                shared_expert_size=r.int("shared_expert_intermediate_size", 0, minimum=0),
                qkv_bias=r.bool("qkv_bias", True), norm_topk_prob=r.bool("norm_topk_prob", False))


FAMILY = Family(model_type="qwen2_moe", parse=parse, shared_expert_gate=True)
