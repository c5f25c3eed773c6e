"""GLM-4.7-Flash: DeepSeek-V3's shape at a small size (latent attention, `ModelConfig.mla`; one shared
expert; sigmoid routing, `arch.sigmoid_routing`) under GLM's name; its dense layers are listed in
`mlp_layer_types` ("dense" / "sparse"; else the first `first_k_dense_replace`, one by default).

Follows transformers' `Glm4MoeLiteForCausalLM`; the multi-token-prediction layer is not read."""

from .family import Family
from .reader import ConfigReader, dense_layers, mla_fields
from .sigmoid_routing import sigmoid_routing


def parse(r: ConfigReader) -> dict:
    mla, c = mla_fields(r, "n_routed_experts", "num_local_experts")
    if r.bool("attention_bias", False):
        r.fail("attention_bias", "false (biases are not supported)")
    params = r.raw.get("rope_parameters") if isinstance(r.raw.get("rope_parameters"), dict) else r.raw
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        r.fail("partial_rotary_factor", "1.0 (latent attention rotates its whole rope part)")
    L, types = c["num_layers"], r.raw.get("mlp_layer_types")
    if types is None:
        dense = range(min(r.int("first_k_dense_replace", 1, minimum=0), L))
    elif not isinstance(types, list) or len(types) != L or any(t not in ("dense", "sparse") for t in types):
        r.fail("mlp_layer_types", f"a list of {L} entries, each 'dense' or 'sparse'")
    else:
        dense = [i for i, t in enumerate(types) if t == "dense"]
    return dict(**c, mla=mla, rope_interleave=r.bool("rope_interleave", True),
                dense_layers=dense_layers(r, L, dense), dense_intermediate_size=r.int("intermediate_size"),
                shared_expert_size=c["intermediate_size"] * r.int("n_shared_experts", 1, minimum=0),
                **sigmoid_routing(r, c["num_experts"], c["top_k"]))


FAMILY = Family(model_type="glm4_moe_lite", parse=parse, shared_expert="mlp.shared_experts", router_fp32=True,
                router_rule="sigmoid_topk", score_bias="mlp.gate.e_score_correction_bias")
