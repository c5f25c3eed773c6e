"""OLMoE (OLMoE-1B-7B): RMSNorm over the whole q and k projections (not per head), then the
optional `clip_qkv` clamp; `norm_topk_prob` false, so top-k weights are not renormalised.

Follows transformers' `OlmoeForCausalLM`."""

from .family import Family

FAMILY = Family(model_type="olmoe", qk_norm="full")
