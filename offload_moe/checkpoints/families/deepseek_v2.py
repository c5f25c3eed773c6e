"""DeepSeek-V2 (DeepSeek-V2-Lite, V2, V2.5): multi-head latent attention (`ModelConfig.mla`),
RoPE on (even, odd) pairs of the rope part of each head, shared experts (`mlp.shared_experts`,
no gate), the first `first_k_dense_replace` layers dense, and group-limited greedy routing with
`routed_scaling_factor` (no renormalisation).

Follows transformers' `DeepseekV2ForCausalLM`; the KV cache holds the compressed latent and the
rotated rope key, as it does."""

from .family import Family
from .reader import ConfigReader, dense_layers, mla_fields


def parse(r: ConfigReader) -> dict:
    mla, c = mla_fields(r, "n_routed_experts", "num_experts")
    L, method = c["num_layers"], r.raw.get("topk_method", "greedy")
    if r.raw.get("scoring_func", "softmax") != "softmax":
        r.fail("scoring_func", "'softmax' (DeepSeek-V2)")
    if method not in ("greedy", "group_limited_greedy"):
        r.fail("topk_method", "'greedy' or 'group_limited_greedy'")
    n_group, topk_group = (r.int("n_group"), r.int("topk_group")) if method == "group_limited_greedy" else (1, 1)
    if c["num_experts"] % n_group or topk_group > n_group:
        r.fail("n_group", f"a divisor of the {c['num_experts']} experts, with topk_group <= n_group")
    first, freq = r.int("first_k_dense_replace", 0, minimum=0), r.int("moe_layer_freq", 1)
    if r.bool("attention_bias", False) or r.bool("mlp_bias", False):
        r.fail("attention_bias" if r.raw.get("attention_bias") else "mlp_bias", "false (biases are not supported)")
    return dict(**c, mla=mla,
                dense_layers=dense_layers(r, L, [i for i in range(L) if i < first or i % freq]),
                dense_intermediate_size=r.int("intermediate_size"),
                shared_expert_size=c["intermediate_size"] * r.int("n_shared_experts", 0, minimum=0),
                norm_topk_prob=r.bool("norm_topk_prob", False),
                routed_scaling_factor=r.float("routed_scaling_factor", 1.0),
                n_group=n_group, topk_group=topk_group)


FAMILY = Family(model_type="deepseek_v2", parse=parse, shared_expert="mlp.shared_experts", router_fp32=True)
