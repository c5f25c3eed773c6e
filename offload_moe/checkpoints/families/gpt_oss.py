"""gpt-oss (gpt-oss-20b, -120b): attention sinks, sliding-window and full layers alternating
(`layer_types`), biases on attention, router and experts, a router that takes the top-k logits
and then a softmax over those, and the clamped SwiGLU `(clamp(up) + 1) · glu(clamp(gate))`.

Follows transformers' `GptOssForCausalLM`. Experts are stored transposed with gate and up columns
interleaved (`layout = "transposed"`), or as published in MXFP4 (`layout = "mxfp4"`, kept packed
in the host tier and the slots, dequantized on use)."""

from ...kernels.mxfp4 import MXFP4Weight
from .family import Family, Row, StackedLayout
from .reader import ConfigReader, common_fields, layer_types


def parse(r: ConfigReader) -> dict:
    c = common_fields(r, experts=r.first("num_local_experts", "num_experts"))
    bias = r.bool("attention_bias", True)
    return dict(**c, sliding_window=r.int("sliding_window", None),
                layer_types=layer_types(r, r.raw.get("layer_types") or (), c["num_layers"]),
                qkv_bias=bias, o_bias=bias, norm_topk_prob=False,
                swiglu_limit=r.float("swiglu_limit", 7.0), swiglu_alpha=r.float("swiglu_alpha", 1.702))


def _transposed_shapes(c, p: str) -> dict[str, tuple[int, ...]]:
    """`gate_up_proj` [E, H, 2I] with gate and up columns interleaved, `down_proj` [E, I, H], biases."""
    H, I, E = c.hidden_size, c.intermediate_size, c.num_experts
    return {p + "gate_up_proj": (E, H, 2 * I), p + "down_proj": (E, I, H),
            p + "gate_up_proj_bias": (E, 2 * I), p + "down_proj_bias": (E, H)}


def _transposed_decode(row: Row, c) -> dict:
    gate_up, bias = row("gate_up_proj"), row("gate_up_proj_bias")
    return {"w1": gate_up[:, 0::2].T.contiguous(), "w3": gate_up[:, 1::2].T.contiguous(),  # [H, 2I] -> [I, H]
            "w2": row("down_proj").T.contiguous(),                                       # [I, H] -> [H, I]
            "b1": bias[0::2].contiguous(), "b3": bias[1::2].contiguous(), "b2": row("down_proj_bias")}


def _mxfp4_shapes(c, p: str) -> dict[str, tuple[int, ...]]:
    """As published: `gate_up_proj_blocks` [E, 2I, H/32, 16] and `_scales` [E, 2I, H/32] (gate and
    up rows interleaved), `down_proj_blocks` [E, H, I/32, 16] and `_scales`, the same biases."""
    H, I, E = c.hidden_size, c.intermediate_size, c.num_experts
    return {p + "gate_up_proj_blocks": (E, 2 * I, H // 32, 16), p + "gate_up_proj_scales": (E, 2 * I, H // 32),
            p + "down_proj_blocks": (E, H, I // 32, 16), p + "down_proj_scales": (E, H, I // 32),
            p + "gate_up_proj_bias": (E, 2 * I), p + "down_proj_bias": (E, H)}


def _mxfp4_decode(row: Row, c) -> dict:
    """Packed [out, in] rows, kept packed; gate and up rows interleaved."""
    gate_up = [row(f"gate_up_proj_{k}") for k in ("blocks", "scales")]
    bias = row("gate_up_proj_bias")
    return {"w1": MXFP4Weight(*(t[0::2].contiguous() for t in gate_up)),
            "w3": MXFP4Weight(*(t[1::2].contiguous() for t in gate_up)),
            "w2": MXFP4Weight(*(row(f"down_proj_{k}") for k in ("blocks", "scales"))),
            "b1": bias[0::2].contiguous(), "b3": bias[1::2].contiguous(), "b2": row("down_proj_bias")}


FAMILY = Family(model_type="gpt_oss", parse=parse, router="mlp.router", layouts=("transposed", "mxfp4"),
                stacked={"transposed": StackedLayout(_transposed_shapes, _transposed_decode),
                         "mxfp4": StackedLayout(_mxfp4_shapes, _mxfp4_decode)},
                router_rule="topk_softmax", router_bias=True, attention_sinks=True, expert_bias=True,
                norm_scale_fp32=True)
