"""OLMoE (OLMoE-1B-7B): RMSNorm over the whole q and k projections (not per head), then the
optional `clip_qkv` clamp; `norm_topk_prob` false, so top-k weights are not renormalised.

Follows transformers' `OlmoeForCausalLM`."""

from .family import Family
from .reader import ConfigReader, common_fields


def parse(r: ConfigReader) -> dict:
    c = common_fields(r, experts=r.first("num_experts", "num_local_experts"))
    if c["head_dim"] * c["num_heads"] != c["hidden_size"]:
        r.fail("head_dim", "hidden_size / num_attention_heads (OLMoE's q/k norms span hidden_size)")
    return dict(**c, qkv_bias=r.bool("attention_bias", False),
                o_bias=r.bool("attention_bias", False), clip_qkv=r.float("clip_qkv", None),
                norm_topk_prob=r.bool("norm_topk_prob", False))


FAMILY = Family(model_type="olmoe", parse=parse, qk_norm="full")
