"""MiniMax-M2: Mixtral's layout and tensor names (`block_sparse_moe.experts.{e}.w1/w3/w2`) with an
RMSNorm over the whole q and k projections (`qk_norm = "full"`), RoPE on the first `rotary_dim`
dims of each head, and sigmoid routing with a selection bias (`block_sparse_moe.e_score_correction_bias`),
the chosen scores always renormalised; no shared expert, no dense layer, no groups.

Follows transformers' `MiniMaxM2ForCausalLM`; the multi-token-prediction modules are not read."""

from .family import Family
from .reader import ConfigReader, common_fields, rotary_dim


def parse(r: ConfigReader) -> dict:
    c = common_fields(r, experts=r.first("num_local_experts", "num_experts"))
    if r.raw.get("scoring_func", "sigmoid") != "sigmoid":
        r.fail("scoring_func", "'sigmoid'")
    if not r.bool("use_qk_norm", True) or r.raw.get("qk_norm_type", "per_layer") != "per_layer":
        r.fail("qk_norm_type", "'per_layer' (an RMSNorm over the whole q and k projections)")
    return dict(**c, rotary_dim=rotary_dim(r, c["head_dim"], 1.0), norm_topk_prob=True)


FAMILY = Family(model_type="minimax_m2", parse=parse, router="block_sparse_moe.gate",
                experts="block_sparse_moe.experts.{e}.", matrices=("w1", "w3", "w2"), qk_norm="full",
                router_fp32=True, router_rule="sigmoid_topk", score_bias="block_sparse_moe.e_score_correction_bias")
