"""gpt-oss (gpt-oss-20b, -120b): attention sinks, sliding-window and full layers alternating
(`layer_types`), biases on attention, router and experts, a router that takes the top-k logits
and then a softmax over those, and the clamped SwiGLU `(clamp(up) + 1) · glu(clamp(gate))`.

Follows transformers' `GptOssForCausalLM`. Experts are stored transposed with gate and up columns
interleaved (`layout = "transposed"`), or as published in MXFP4 (`layout = "mxfp4"`, kept packed
in the host tier and the slots, dequantized on use)."""

from .family import Family

FAMILY = Family(model_type="gpt_oss", router="mlp.router", layouts=("transposed", "mxfp4"), router_rule="topk_softmax",
                router_bias=True, attention_sinks=True, expert_bias=True, norm_scale_fp32=True)
