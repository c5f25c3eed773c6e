"""What one MoE family fixes that its `config.json` does not say: tensor names and model options.

A `Family` is a table. Names are relative to `model.layers.{i}.`; sizes come from `ModelConfig`.
The functions below turn a config and a family into the checkpoint's tensor names and shapes,
for every family at once, so a new family is a new table and its config parser, not new code.

Expert layouts on disk (`layout`):
- "per_expert": `{experts}{e}.{gate}/{up}/{down}.weight`, [I, H], [I, H], [H, I] (published
  checkpoints and transformers' default `save_pretrained`)
- "fused" (`FUSED`): `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
  `mlp.experts.down_proj` [E, H, I] (transformers' `save_original_format=False`)
- a family's own stacked layouts, declared in its file (gpt-oss: "transposed", "mxfp4")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .reader import ConfigReader


ConfigLike = Any  # a `config.ModelConfig`: read here, never imported (the config layer sits above)
Row = Callable[[str], torch.Tensor]  # tensor name after `mlp.experts.` -> this expert's row of it


@dataclass(frozen=True)
class StackedLayout:
    """Experts stacked along a leading E axis in a few tensors per layer."""
    shapes: Callable[[ConfigLike, str], dict[str, tuple[int, ...]]]  # (config, layer prefix) -> name: shape
    decode: Callable[[Row, ConfigLike], dict]  # one expert's rows -> {"w1", "w3", "w2"[, "b1", "b3", "b2"]}


def _fused_shapes(c, p: str) -> dict[str, tuple[int, ...]]:
    H, I, E = c.hidden_size, c.intermediate_size, c.num_experts
    return {p + "gate_up_proj": (E, 2 * I, H), p + "down_proj": (E, H, I)}


def _fused_decode(row: Row, c) -> dict:
    I = c.intermediate_size
    gate_up = row("gate_up_proj")  # [2I, H]
    return {"w1": gate_up[:I].contiguous(), "w3": gate_up[I:].contiguous(), "w2": row("down_proj")}  # w2 [H, I]


FUSED = StackedLayout(_fused_shapes, _fused_decode)


@dataclass(frozen=True)
class Family:
    model_type: str
    parse: Callable[[ConfigReader], dict]  # config.json -> `ModelConfig` fields (all but model_type)
    # ---- names inside `model.layers.{i}.` ----
    router: str = "mlp.gate"                   # [E, H] router weight (module name, no `.weight`)
    experts: str = "mlp.experts.{e}."          # per-expert prefix
    matrices: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # our w1, w3, w2
    shared_expert: str = "mlp.shared_expert"   # the dense SwiGLU every token uses, if the config has one
    layouts: tuple[str, ...] = ("per_expert", "fused")
    stacked: Mapping[str, StackedLayout] = field(default_factory=lambda: {"fused": FUSED})
    # ---- model options ----
    qk_norm: str | None = None      # "head": RMSNorm over each head's hd (Qwen3); "full": over all of q, k (OLMoE)
    router_rule: str = "softmax_topk"   # see `model.ROUTER_RULES`
    router_bias: bool = False
    score_bias: str | None = None       # sigmoid routing's selection bias [E] (`e_score_correction_bias`), its name
    router_fp32: bool = False           # router logits computed in fp32 whatever the compute dtype (DeepSeek)
    shared_expert_gate: bool = False    # the shared expert's output is scaled by sigmoid(x · gate) (Qwen2-MoE)
    attention_sinks: bool = False       # a learned per-head logit that takes part in the softmax (gpt-oss)
    expert_bias: bool = False           # the expert matrices carry biases (gpt-oss)
    norm_scale_fp32: bool = False       # RMSNorm multiplies by its weight in fp32, then casts (gpt-oss)
    attention_output_gate: bool = False  # q_proj also gives a per-head gate: o_proj(attn * sigmoid(gate)) (Qwen3-Next)
    router_scales_input: bool = False   # the routing weight multiplies the expert's input, not its output (Llama 4)
    rope_interleaved: bool = False      # RoPE rotates (2i, 2i+1) pairs in fp32, as a complex product (Llama 4)
    # stored tensor name -> our name (`model.layers.{i}.mlp...`), None for tensors the text model does not
    # use (a vision tower); None: names are ours already
    rename: Callable[[str], str | None] | None = None


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def router_name(c: ConfigLike, fam: Family, layout: str, layer: int) -> str:
    """The router's weight: Mixtral's per-expert checkpoints call it block_sparse_moe.gate."""
    return layer_prefix(layer) + ("mlp.gate" if layout == "fused" else fam.router) + ".weight"


def score_bias_name(c: ConfigLike, fam: Family, layout: str, layer: int) -> str:
    """The selection bias of sigmoid routing: MiniMax-M2's per-expert checkpoints keep it beside the
    router (`block_sparse_moe.e_score_correction_bias`), its fused ones under `mlp.`."""
    name = fam.score_bias
    if layout == "fused" and name.startswith("block_sparse_moe."):
        name = "mlp." + name.removeprefix("block_sparse_moe.")
    return layer_prefix(layer) + name


def attention_shapes(c: ConfigLike, fam: Family) -> dict[str, tuple[int, ...]]:
    """Names (after `self_attn.`) and shapes of one layer's attention tensors."""
    H, nh, nkv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    if c.mla is not None:
        m = c.mla
        s = {}
        if m.q_lora_rank:
            s |= {"q_a_proj.weight": (m.q_lora_rank, H), "q_a_layernorm.weight": (m.q_lora_rank,),
                  "q_b_proj.weight": (nh * hd, m.q_lora_rank)}
        else:
            s["q_proj.weight"] = (nh * hd, H)
        return s | {"kv_a_proj_with_mqa.weight": (m.kv_lora_rank + m.qk_rope_head_dim, H),
                    "kv_a_layernorm.weight": (m.kv_lora_rank,),
                    "kv_b_proj.weight": (nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
                    "o_proj.weight": (H, nh * m.v_head_dim)}
    s = {"q_proj.weight": (nh * hd * (1 + fam.attention_output_gate), H), "k_proj.weight": (nkv * hd, H),
         "v_proj.weight": (nkv * hd, H),
         "o_proj.weight": (H, nh * hd)}
    if c.qkv_bias:
        s |= {"q_proj.bias": (nh * hd * (1 + fam.attention_output_gate),), "k_proj.bias": (nkv * hd,), "v_proj.bias": (nkv * hd,)}
    if c.o_bias:
        s["o_proj.bias"] = (H,)
    if c.qk_norm == "head":
        s |= {"q_norm.weight": (hd,), "k_norm.weight": (hd,)}
    elif c.qk_norm == "full":
        s |= {"q_norm.weight": (nh * hd,), "k_norm.weight": (nkv * hd,)}
    if fam.attention_sinks:
        s["sinks"] = (nh,)
    return s


def linear_attention_shapes(c: ConfigLike, fam: Family) -> dict[str, tuple[int, ...]]:
    """Names (after `linear_attn.`) and shapes of one Gated DeltaNet layer's tensors."""
    la, H = c.linear_attention, c.hidden_size
    nv = la.num_value_heads
    if la.projections == "grouped":
        s = {"in_proj_qkvz.weight": (2 * la.key_dim + 2 * la.value_dim, H), "in_proj_ba.weight": (2 * nv, H)}
    else:
        s = {"in_proj_qkv.weight": (la.conv_dim, H), "in_proj_z.weight": (la.value_dim, H),
             "in_proj_b.weight": (nv, H), "in_proj_a.weight": (nv, H)}
    return s | {"conv1d.weight": (la.conv_dim, 1, la.conv_kernel), "dt_bias": (nv,), "A_log": (nv,),
                "norm.weight": (la.value_head_dim,), "out_proj.weight": (H, la.value_dim)}


def mixer_shapes(c: ConfigLike, fam: Family, layer: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint names (after `model.layers.{layer}.`) and shapes of a layer's token mixer."""
    if c.is_linear(layer):
        return {"linear_attn." + k: v for k, v in linear_attention_shapes(c, fam).items()}
    return {"self_attn." + k: v for k, v in attention_shapes(c, fam).items()}


def mlp_shapes(prefix: str, hidden: int, inner: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.gate_proj.weight": (inner, hidden), f"{prefix}.up_proj.weight": (inner, hidden),
            f"{prefix}.down_proj.weight": (hidden, inner)}


def dense_shapes(c: ConfigLike, fam: Family, layout: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor that is not a routed expert."""
    H, V, E = c.hidden_size, c.vocab_size, c.num_experts
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i in range(c.num_layers):
        p = layer_prefix(i)
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        shapes |= {p + k: v for k, v in mixer_shapes(c, fam, i).items()}
        if i in c.dense_layers:
            shapes |= mlp_shapes(p + "mlp", H, c.dense_intermediate_size)
            continue
        router = router_name(c, fam, layout, i)
        shapes[router] = (E, H)
        if fam.router_bias:
            shapes[router.removesuffix("weight") + "bias"] = (E,)
        if fam.score_bias:
            shapes[score_bias_name(c, fam, layout, i)] = (E,)
        if c.shared_expert_size:
            shapes |= mlp_shapes(p + fam.shared_expert, H, c.shared_expert_size)
            if fam.shared_expert_gate:
                shapes[p + "mlp.shared_expert_gate.weight"] = (1, H)
    return shapes


def expert_names(c: ConfigLike, fam: Family, layer: int, expert: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Per-expert layout: {"w1" | "w3" | "w2": (checkpoint name, shape)}."""
    H, I = c.hidden_size, c.intermediate_size
    p = layer_prefix(layer) + fam.experts.format(e=expert)
    gate, up, down = fam.matrices
    return {"w1": (f"{p}{gate}.weight", (I, H)), "w3": (f"{p}{up}.weight", (I, H)), "w2": (f"{p}{down}.weight", (H, I))}


def expert_shapes(c: ConfigLike, fam: Family, layout: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every routed-expert tensor."""
    shapes = {}
    for i in c.moe_layers:
        if layout in fam.stacked:
            shapes |= fam.stacked[layout].shapes(c, layer_prefix(i) + "mlp.experts.")
        else:
            for e in range(c.num_experts):
                shapes |= dict(expert_names(c, fam, i, e).values())
    return shapes


# Checkpoint -> model parameter names, beyond dropping the leading `model.`: the model calls its
# MoE block `block_sparse_moe` (router `gate`, `shared_expert`, `shared_expert_gate`,
# `e_score_correction_bias`) in every family.
PARAM_RENAMES = ((".mlp.gate.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias"),
                 (".mlp.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias"),
                 (".mlp.gate.", ".block_sparse_moe.gate."), (".mlp.router.", ".block_sparse_moe.gate."),
                 (".mlp.shared_experts.", ".block_sparse_moe.shared_expert."),
                 (".mlp.shared_expert.", ".block_sparse_moe.shared_expert."),
                 (".mlp.shared_expert_gate.", ".block_sparse_moe.shared_expert_gate."))


def param_name(checkpoint_name: str) -> str:
    """Checkpoint tensor name -> the transformer's parameter name."""
    name = checkpoint_name.removeprefix("model.")
    for old, new in PARAM_RENAMES:
        name = name.replace(old, new)
    return name
