"""DeepSeek-V3 / R1 and Kimi-K2 (whose config.json says `kimi_k2`): DeepSeek-V2's latent attention
(`ModelConfig.mla`), shared experts and first `first_k_dense_replace` dense layers, with sigmoid
routing ("noaux_tc", `arch.sigmoid_routing`: the selection bias `mlp.gate.e_score_correction_bias`,
group-limited top-k, renormalised, then scaled by `routed_scaling_factor`).

Follows transformers' `DeepseekV3ForCausalLM`. The multi-token-prediction layer published after the
last layer (`num_nextn_predict_layers`) is not part of the model: it is neither read nor counted."""

from dataclasses import replace

from .family import Family
from .reader import ConfigReader, dense_layers, mla_fields
from .sigmoid_routing import sigmoid_routing


def parse(r: ConfigReader) -> dict:
    mla, c = mla_fields(r, "n_routed_experts", "num_local_experts")
    if r.bool("attention_bias", False):
        r.fail("attention_bias", "false (biases are not supported)")
    L = c["num_layers"]
    first, freq = r.int("first_k_dense_replace", 0, minimum=0), r.int("moe_layer_freq", 1)
    return dict(**c, mla=mla, rope_interleave=r.bool("rope_interleave", True),
                dense_layers=dense_layers(r, L, [i for i in range(L) if i < first or i % freq]),
                dense_intermediate_size=r.int("intermediate_size"),
                shared_expert_size=c["intermediate_size"] * r.int("n_shared_experts", 0, minimum=0),
                **sigmoid_routing(r, c["num_experts"], c["top_k"]))


FAMILY = Family(model_type="deepseek_v3", parse=parse, shared_expert="mlp.shared_experts", router_fp32=True,
                router_rule="sigmoid_topk", score_bias="mlp.gate.e_score_correction_bias")
KIMI_K2 = replace(FAMILY, model_type="kimi_k2")  # Kimi-K2 ships DeepSeek-V3's code under its own name
