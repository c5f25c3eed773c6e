"""The config keys of DeepSeek-V3's sigmoid routing ("noaux_tc"), shared by the families that
route that way (DeepSeek-V3 / Kimi-K2, GLM-4.5, GLM-4.7-Flash): sigmoid scores, a selection-only
`e_score_correction_bias`, group-limited choice, renormalisation and `routed_scaling_factor`
(`model.sigmoid_topk` computes it)."""

from .reader import ConfigReader


def sigmoid_routing(r: ConfigReader, num_experts: int, top_k: int) -> dict:
    """-> the `ModelConfig` fields of the router: norm_topk_prob, routed_scaling_factor, n_group, topk_group."""
    if r.raw.get("scoring_func", "sigmoid") != "sigmoid":
        r.fail("scoring_func", "'sigmoid'")
    if r.raw.get("topk_method", "noaux_tc") != "noaux_tc":
        r.fail("topk_method", "'noaux_tc'")
    n_group, topk_group = r.int("n_group", 1), r.int("topk_group", 1)
    if num_experts % n_group or topk_group > n_group:
        r.fail("n_group", f"a divisor of the {num_experts} experts, with topk_group <= n_group")
    if n_group > 1 and (num_experts // n_group < 2 or topk_group * num_experts // n_group < top_k):
        r.fail("topk_group", f"enough groups of at least 2 experts for the top-{top_k}")
    return dict(norm_topk_prob=r.bool("norm_topk_prob", True),
                routed_scaling_factor=r.float("routed_scaling_factor", 1.0), n_group=n_group, topk_group=topk_group)
