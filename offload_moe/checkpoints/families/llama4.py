"""Llama 4 (Scout-17B-16E, Maverick-17B-128E), the text model: top-1 sigmoid routing whose weight
scales the expert's *input*, a shared expert in every MoE layer, MoE on every
`interleave_moe_layer_step`-th layer and dense MLPs (`intermediate_size_mlp`) between; attention
local to chunks of `attention_chunk_size` positions on the RoPE layers and global on the NoPE
layers (`no_rope_layers[i] == 0`), L2 q/k norms on the RoPE layers (`use_qk_norm`), a query
temperature growing with the position on the NoPE layers (`attn_temperature_tuning`), and RoPE on
interleaved (2i, 2i+1) pairs (Meta's complex form), llama3-scaled in Scout.

Follows transformers' `Llama4ForCausalLM` (`model_type` "llama4_text"). A published checkpoint is
`Llama4ForConditionalGeneration` ("llama4"): the text model's config under `text_config`, its
tensors under `language_model.`; the vision tower is not read (logged once).

Experts are stacked as transformers and Meta store them: `feed_forward.experts.gate_up_proj`
[E, H, 2I] (gate columns, then up columns) and `down_proj` [E, I, H]; the `feed_forward.` of
every layer reads as our `mlp.` (`rename`)."""

from __future__ import annotations

import logging

from .family import Family, Row, StackedLayout
from .reader import ConfigReader, common_fields, dense_layers

log = logging.getLogger("offload_moe")

TYPES = ("chunked_attention", "full_attention")


def parse(r: ConfigReader) -> dict:
    c = common_fields(r, experts="num_local_experts")
    L = c["num_layers"]
    moe = r.raw.get("moe_layers")
    if moe is None:
        step = r.int("interleave_moe_layer_step", 1)
        moe = list(range(step - 1, L, step))
    elif not isinstance(moe, list) or not all(isinstance(i, int) and 0 <= i < L for i in moe):
        r.fail("moe_layers", f"a list of layer indices below {L}")
    rope = r.raw.get("no_rope_layers") or [int((i + 1) % r.int("no_rope_layer_interval", 4) != 0) for i in range(L)]
    if not isinstance(rope, list) or len(rope) != L or any(v not in (0, 1) for v in rope):
        r.fail("no_rope_layers", f"a list of {L} entries, each 0 (no RoPE) or 1")
    chunk = r.int("attention_chunk_size", None)
    types = r.raw.get("layer_types") or ["chunked_attention" if use and chunk else "full_attention" for use in rope]
    if not isinstance(types, list) or len(types) != L or any(t not in TYPES for t in types):
        r.fail("layer_types", f"a list of {L} entries, each one of {', '.join(TYPES)}")
    if "chunked_attention" in types and chunk is None:
        r.fail("attention_chunk_size", "an integer >= 1 (layer_types has chunked_attention layers)")
    bias = r.bool("attention_bias", False)
    tuning = r.raw.get("attn_temperature_tuning", True)  # Meta's configs say 4: transformers reads it as true
    if not isinstance(tuning, (bool, int)):
        r.fail("attn_temperature_tuning", "true, false or an integer")
    return dict(**c, dense_layers=dense_layers(r, L, [i for i in range(L) if i not in moe]),
                dense_intermediate_size=r.int("intermediate_size_mlp"),
                shared_expert_size=c["intermediate_size"], norm_topk_prob=False,
                qkv_bias=bias, o_bias=bias, layer_types=tuple(types), attention_chunk=chunk,
                nope_layers=tuple(i for i in range(L) if not rope[i]), qk_l2_norm=r.bool("use_qk_norm", True),
                attn_temperature=(r.float("floor_scale", 8192.0), r.float("attn_scale", 0.1))
                if tuning else None)


def parse_multimodal(r: ConfigReader) -> dict:
    """`Llama4ForConditionalGeneration`'s config.json: the text model's part, `text_config`."""
    text = r.raw.get("text_config")
    if not isinstance(text, dict):
        r.fail("text_config", "an object (the Llama 4 text model's configuration)")
    if "vision_config" in r.raw:
        log.info("%s: a Llama 4 model with a vision tower: only the text model is read", r.source)
    inherited = {k: r.raw[k] for k in ("torch_dtype", "dtype") if k in r.raw and k not in text}
    return parse(ConfigReader(text | inherited, f"{r.source} (text_config)"))


# stored prefix -> ours: Llama4ForConditionalGeneration keeps the text model under `language_model.`
PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))
TEXT = ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")


def rename(stored: str) -> str | None:
    """A stored tensor name -> ours, or None for the vision tower and its projector."""
    for old, new in PREFIXES:
        if stored.startswith(old):
            stored = new + stored[len(old):]
            break
    return stored.replace(".feed_forward.", ".mlp.") if stored.startswith(TEXT) else None


def _shapes(c, p: str) -> dict[str, tuple[int, ...]]:
    H, I, E = c.hidden_size, c.intermediate_size, c.num_experts
    return {p + "gate_up_proj": (E, H, 2 * I), p + "down_proj": (E, I, H)}


def _decode(row: Row, c) -> dict:
    I = c.intermediate_size
    gate_up = row("gate_up_proj")                                     # [H, 2I]
    return {"w1": gate_up[:, :I].T.contiguous(), "w3": gate_up[:, I:].T.contiguous(),  # [I, H]
            "w2": row("down_proj").T.contiguous()}                    # [I, H] -> [H, I]


STACKED = {"stacked": StackedLayout(_shapes, _decode)}
OPTIONS = dict(router="mlp.router", layouts=("stacked", "per_expert"), stacked=STACKED, router_rule="topk_sigmoid",
               router_scales_input=True, rope_interleaved=True, rename=rename)

FAMILY = Family(model_type="llama4_text", parse=parse, **OPTIONS)
MULTIMODAL = Family(model_type="llama4", parse=parse_multimodal, **OPTIONS)
