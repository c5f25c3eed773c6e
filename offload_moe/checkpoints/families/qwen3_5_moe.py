"""Qwen3.5 / Qwen3.6 MoE (Qwen3.5-35B-A3B): the hybrid layers of Qwen3-Next (`qwen3_next`), 256
experts, top-8 always renormalised, every layer MoE; the DeltaNet's projections come as separate
matrices (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`). Its rotary embedding is
multimodal (M-RoPE); for text every position grid is the token's position, which is plain RoPE.

Follows transformers' `Qwen3_5MoeForCausalLM` (model_type `qwen3_5_moe_text`). The published
checkpoints are `Qwen3_5MoeForConditionalGeneration` (model_type `qwen3_5_moe`): their config.json
nests the language model's keys under `text_config`, which is what is read here, and name its
tensors `model.language_model.*`, read as `model.*` (the vision encoder `model.visual.*` and the
multi-token-prediction layer `mtp.*` are not read, run nor counted: text in, text out)."""

from dataclasses import replace

from .family import Family
from .qwen3_next import hybrid_fields
from .reader import ConfigReader, common_fields


def parse(r: ConfigReader) -> dict:
    text = r.raw.get("text_config")
    if text is not None:
        if not isinstance(text, dict):
            r.fail("text_config", "an object (the language model's config)")
        r = ConfigReader({"torch_dtype": r.raw.get("torch_dtype") or r.raw.get("dtype"), **text},
                         f"{r.source} text_config")
    c = common_fields(r, experts="num_experts", intermediate="moe_intermediate_size", head_dim=r.int("head_dim", 256))
    return dict(**c, **hybrid_fields(r, c["num_layers"], "split"), norm_topk_prob=True)


TEXT = ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")


def rename(stored: str) -> str | None:
    """A stored tensor name -> ours (`model.language_model.*` read as `model.*`), or None for the vision
    encoder and the multi-token-prediction layer."""
    if stored.startswith("model.language_model."):
        stored = "model." + stored.removeprefix("model.language_model.")
    return stored if stored.startswith(TEXT) else None


FAMILY = Family(model_type="qwen3_5_moe", parse=parse, qk_norm="head", shared_expert_gate=True,
                attention_output_gate=True, norm_scale_fp32=True, rename=rename)
TEXT_FAMILY = replace(FAMILY, model_type="qwen3_5_moe_text", rename=None)  # the language model alone (`Qwen3_5MoeForCausalLM`)
