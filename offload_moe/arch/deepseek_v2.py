"""DeepSeek-V2 (DeepSeek-V2-Lite, V2, V2.5): multi-head latent attention (`ModelConfig.mla`),
RoPE on (even, odd) pairs of the rope part of each head, shared experts (`mlp.shared_experts`,
no gate), the first `first_k_dense_replace` layers dense, and group-limited greedy routing with
`routed_scaling_factor` (no renormalisation).

Follows transformers' `DeepseekV2ForCausalLM`; the KV cache holds the compressed latent and the
rotated rope key, as it does."""

from .family import Family

FAMILY = Family(model_type="deepseek_v2", shared_expert="mlp.shared_experts", router_fp32=True)
