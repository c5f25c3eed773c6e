"""Qwen3-Next (Qwen3-Next-80B-A3B): hybrid token mixing, three Gated DeltaNet layers (linear
attention with a recurrent state, `ModelConfig.linear_attention`) to one gated full-attention layer
(a sigmoid gate on each head's output, RoPE on the first quarter of each head, q/k RMSNorm per
head); 512 routed experts, top-10 renormalised, and a sigmoid-gated shared expert in every layer.
Its RMSNorms store weight - 1 ("zero-centred": the model multiplies by 1 + weight), except the gated
norm inside the DeltaNet.

Follows transformers' `Qwen3NextForCausalLM`. The DeltaNet's projections come grouped by key head
(`in_proj_qkvz`: per key head q, k, its value heads' v and z; `in_proj_ba`: their b and a)."""

from .family import Family
from .reader import ConfigReader, LinearAttention, common_fields, layer_types, qwen_dense_layers, rotary_dim

HYBRID_KINDS = ("linear_attention", "full_attention")


def hybrid_fields(r: ConfigReader, num_layers: int, projections: str) -> dict:
    """What Qwen3-Next and Qwen3.5 read alike: the DeltaNet's sizes, which layers mix tokens how,
    partial rotary, the shared expert."""
    linear = LinearAttention(num_key_heads=r.int("linear_num_key_heads", 16),
                             num_value_heads=r.int("linear_num_value_heads", 32),
                             key_head_dim=r.int("linear_key_head_dim", 128),
                             value_head_dim=r.int("linear_value_head_dim", 128),
                             conv_kernel=r.int("linear_conv_kernel_dim", 4, minimum=2), projections=projections)
    if linear.num_value_heads % linear.num_key_heads:
        r.fail("linear_num_value_heads", f"a multiple of linear_num_key_heads ({linear.num_key_heads})")
    interval = r.int("full_attention_interval", 4)
    types = r.raw.get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                         for i in range(num_layers)]
    types = layer_types(r, types, num_layers, HYBRID_KINDS)
    if "full_attention" not in types:
        r.fail("layer_types", "at least one full_attention layer")
    bias = r.bool("attention_bias", False)
    return dict(linear_attention=linear, layer_types=types, rotary_dim=rotary_dim(r, r.int("head_dim", 256), 0.25),
                shared_expert_size=r.int("shared_expert_intermediate_size", 0, minimum=0),
                qkv_bias=bias, o_bias=bias, zero_centred_norms=True)


def parse(r: ConfigReader) -> dict:
    c = common_fields(r, experts=r.first("num_experts", "num_local_experts"), intermediate="moe_intermediate_size",
                      head_dim=r.int("head_dim", 256))
    L = c["num_layers"]
    return dict(**c, **hybrid_fields(r, L, "grouped"), dense_layers=qwen_dense_layers(r, L),
                dense_intermediate_size=r.int("intermediate_size"), norm_topk_prob=r.bool("norm_topk_prob", True))


FAMILY = Family(model_type="qwen3_next", parse=parse, qk_norm="head", shared_expert_gate=True,
                attention_output_gate=True, norm_scale_fp32=True)
