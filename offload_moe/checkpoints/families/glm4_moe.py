"""GLM-4.5, GLM-4.6, GLM-4.5-Air: grouped-query attention with q/k/v biases (`attention_bias`), an
optional q/k RMSNorm per head (`use_qk_norm`), RoPE on the first half of each head only
(`partial_rotary_factor`, 0.5 by default), one shared expert (`mlp.shared_experts`), the first
`first_k_dense_replace` layers dense, and DeepSeek-V3's sigmoid routing (`arch.sigmoid_routing`).

Follows transformers' `Glm4MoeForCausalLM`. The multi-token-prediction layer published after the last
layer (`num_nextn_predict_layers`) is not part of the model: neither read nor counted."""

from .family import Family
from .reader import ConfigReader, common_fields, dense_layers, rotary_dim
from .sigmoid_routing import sigmoid_routing


def parse(r: ConfigReader) -> dict:
    c = common_fields(r, experts=r.first("n_routed_experts", "num_local_experts"), intermediate="moe_intermediate_size")
    L, first = c["num_layers"], r.int("first_k_dense_replace", 1, minimum=0)
    return dict(**c, rotary_dim=rotary_dim(r, c["head_dim"], 0.5),
                qkv_bias=r.bool("attention_bias", False), use_qk_norm=r.bool("use_qk_norm", False),
                dense_layers=dense_layers(r, L, range(min(first, L))),
                dense_intermediate_size=r.int("intermediate_size"),
                shared_expert_size=c["intermediate_size"] * r.int("n_shared_experts", 1, minimum=0),
                **sigmoid_routing(r, c["num_experts"], c["top_k"]))


FAMILY = Family(model_type="glm4_moe", parse=parse, shared_expert="mlp.shared_experts", router_fp32=True,
                router_rule="sigmoid_topk", score_bias="mlp.gate.e_score_correction_bias", qk_norm="head")
