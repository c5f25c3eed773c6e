"""GGUF metadata -> `ModelConfig`, through the same parsers as config.json.

llama.cpp's converter writes `{arch}.*` keys (`gguf.Keys.LLM`) in place of config.json. We
rebuild the config.json keys our parsers read from them, so every check and default is shared.
Each key is read with the type we expect (`GGUFFile.typed`): a string `embedding_length` or a
list where a number belongs is one line naming the file and the key. Architectures, as the converter names them: Mixtral is `llama` with expert tensors; `qwen3moe`,
`qwen2moe`, `olmoe`, `deepseek2`, `gpt-oss`, `llama4`. Where llama.cpp fixes a behaviour in code rather
than in the file, so do we (e.g. qwen3moe always renormalises its top-k weights; gpt-oss alternates
sliding and full attention from layer 0; llama4's chunks, NoPE layers and temperature).
"""

from __future__ import annotations

import re
from dataclasses import replace

from ..families.reader import LIMITS
from ..config import ModelConfig
from ...base.errors import OffloadMoeError
from .reader import GGUFFile

ARCHES = {"llama": "mixtral", "qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "olmoe": "olmoe",
          "deepseek2": "deepseek_v2", "gpt-oss": "gpt_oss", "glm4moe": "glm4_moe", "minimax-m2": "minimax_m2",
          "qwen3next": "qwen3_next", "qwen35moe": "qwen3_5_moe_text",
          "llama4": "llama4_text"}
SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
FLOAT_NAMES = {0: "float32", 1: "float16", 30: "bfloat16"}  # ggml F32, F16, BF16
BLOCK_TENSOR = re.compile(r"blk\.(\d{1,6})\.")


def model_type(f: GGUFFile) -> str:
    arch = f.typed("general.architecture", "a string")
    if arch not in ARCHES:
        raise OffloadMoeError(f"{f.path}: general.architecture = {arch!r} is not supported "
                              f"(supported: {', '.join(sorted(ARCHES))})")
    if not f.typed(f"{arch}.expert_count", "a non-negative integer"):
        raise OffloadMoeError(f"{f.path}: {arch}.expert_count is missing or 0: a dense {arch} model, "
                              "not a mixture of experts")
    if arch == "deepseek2" and sigmoid_routed(f, arch):
        return "deepseek_v3"  # DeepSeek-V3/R1, Kimi-K2 and GLM-4.7-Flash are all deepseek2 with sigmoid routing
    return ARCHES[arch]


def sigmoid_routed(f: GGUFFile, arch: str) -> bool:
    """Sigmoid routing: the gating function says so, or (the converter writes it only from config.json's
    `scoring_func`) a selection bias `exp_probs_b`, which only sigmoid routing has."""
    return (f.typed(f"{arch}.expert_gating_func", "a non-negative integer", 0) == SIGMOID
            or any(name.endswith("exp_probs_b.bias") for name in f.tensors))


def config_from_gguf(f: GGUFFile, quantization: dict | None = None) -> ModelConfig:
    """The model's config from the header alone (tensor shapes settle the vocabulary and tying)."""
    raw = config_json(f)
    if quantization is not None:
        raw["quantization_config"] = quantization
    cfg = ModelConfig.from_dict(raw, source=str(f.path))
    if cfg.linear_attention is not None:  # the converter stores norm weights + 1 and the DeltaNet's inputs split
        cfg = replace(cfg, zero_centred_norms=False, linear_attention=replace(cfg.linear_attention, projections="split"))
    return cfg


def config_json(f: GGUFFile) -> dict:
    """The config.json (transformers' keys) our parsers read, rebuilt from the header."""
    mt = model_type(f)
    arch = f.get("general.architecture")

    def key(name, default=..., kind="a non-negative integer"):
        full = f"{arch}.{name}"
        if full not in f.fields and default is ...:
            raise OffloadMoeError(f"{f.path}: metadata key {full!r} is missing")
        return f.typed(full, kind, None if default is ... else default)

    def number(name, default=...):
        return key(name, default, "a number")

    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise OffloadMoeError(f"{f.path}: tensor 'token_embd.weight' is missing")
    if len(embd.shape) != 2:
        raise OffloadMoeError(f"{f.path}: tensor 'token_embd.weight' has shape {list(embd.shape)}, "
                              "expected [vocabulary, hidden]")
    per_layer = "a non-negative integer or a list of them"
    heads = key("attention.head_count", kind=per_layer)
    if isinstance(heads, list):
        heads = heads[0]
    kv = key("attention.head_count_kv", heads, kind=per_layer)
    kv = kv[0] if isinstance(kv, list) else kv
    hidden = key("embedding_length")
    # blocks past the model's layers are multi-token-prediction ones (GLM-4.5, GLM-4.7-Flash, Qwen3-Next/3.5
    # converted with their MTP): not run, as llama.cpp's generation does not run them
    layers = key("block_count") - key("nextn_predict_layers", 0)
    if layers < 1:
        raise OffloadMoeError(f"{f.path}: metadata key '{arch}.nextn_predict_layers' = {key('nextn_predict_layers')} "
                              f"leaves no layer of the {key('block_count')} blocks")
    if layers > LIMITS["num_hidden_layers"]:  # before any loop over the layers
        raise OffloadMoeError(f"{f.path}: metadata key '{arch}.block_count' = {layers:,}, expected at most "
                              f"{LIMITS['num_hidden_layers']}")
    present = {int(m[1]) for name in f.tensors if (m := BLOCK_TENSOR.match(name))}
    missing = next((i for i in range(layers) if i not in present), None)
    if missing is not None:  # before tables are built per layer (the gguf package's name maps: seconds for 4096)
        raise OffloadMoeError(f"{f.path}: metadata key '{arch}.block_count' = {layers:,}, but the file holds no "
                              f"tensor of block {missing} (blk.{missing}.*)")
    eos = f.typed("tokenizer.ggml.eos_token_id", "a non-negative integer")
    raw = {
        "model_type": mt,
        "vocab_size": embd.shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": key("attention.key_length", hidden // heads if heads else None),
        "max_position_embeddings": key("context_length", 4096),
        "rms_norm_eps": number("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": number("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "bos_token_id": f.typed("tokenizer.ggml.bos_token_id", "a non-negative integer"),
        "eos_token_id": eos,
        "torch_dtype": FLOAT_NAMES.get(embd.type, "float16"),
        "num_experts_per_tok": key("expert_used_count"),
    }
    experts = key("expert_count")
    expert_ff = key("expert_feed_forward_length", None)
    ff = key("feed_forward_length", None)
    window = key("attention.sliding_window", None)
    if mt == "mixtral":
        raw |= {"num_local_experts": experts, "intermediate_size": expert_ff or ff, "sliding_window": window,
                "head_dim": key("rope.dimension_count", raw["head_dim"])}
    elif mt in ("qwen3_moe", "qwen2_moe"):
        raw |= {"num_experts": experts, "moe_intermediate_size": expert_ff, "intermediate_size": ff or expert_ff,
                "norm_topk_prob": bool(key("expert_weights_norm", mt == "qwen3_moe", "a bool or an integer")),
                "attention_bias": False,
                "mlp_only_layers": [i for i in range(raw["num_hidden_layers"])  # dense: no router tensor
                                    if f"blk.{i}.ffn_gate_inp.weight" not in f.tensors]}
        if mt == "qwen2_moe":
            raw["shared_expert_intermediate_size"] = key("expert_shared_feed_forward_length", 0)
            raw["qkv_bias"] = "blk.0.attn_q.bias" in f.tensors
        else:
            raw["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
    elif mt in ("qwen3_next", "qwen3_5_moe_text"):  # Qwen3NextModel.set_gguf_parameters
        layers, value_heads = raw["num_hidden_layers"], key("ssm.time_step_rank")
        recurrent = key("attention.recurrent_layers", None, "a list of bools")
        if recurrent is not None and len(recurrent) < layers:
            raise OffloadMoeError(f"{f.path}: metadata key '{arch}.attention.recurrent_layers' has {len(recurrent)} "
                                  f"entries, expected one per block ({layers})")
        interval = key("full_attention_interval", 4)
        raw |= {"num_experts": experts, "moe_intermediate_size": expert_ff, "intermediate_size": ff or expert_ff,
                "shared_expert_intermediate_size": key("expert_shared_feed_forward_length", 0),
                "norm_topk_prob": bool(key("expert_weights_norm", True, "a bool or an integer")),  # llama.cpp: always
                "linear_conv_kernel_dim": key("ssm.conv_kernel"), "linear_key_head_dim": key("ssm.state_size"),
                "linear_num_key_heads": key("ssm.group_count"), "linear_num_value_heads": value_heads,
                "linear_value_head_dim": key("ssm.inner_size") // max(value_heads, 1),
                "layer_types": ["linear_attention" if (recurrent[i] if recurrent else (i + 1) % interval)
                                else "full_attention" for i in range(layers)],
                "rotary_dim": key("rope.dimension_count"),
                "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in f.tensors]}
    elif mt == "olmoe":
        raw |= {"num_experts": experts, "intermediate_size": expert_ff or ff, "norm_topk_prob": False,
                "attention_bias": "blk.0.attn_q.bias" in f.tensors, "clip_qkv": number("attention.clamp_kqv", None)}
    elif mt == "gpt_oss":
        layers = raw["num_hidden_layers"]
        raw |= {"num_local_experts": experts, "intermediate_size": expert_ff or ff, "sliding_window": window,
                "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                "attention_bias": "blk.0.attn_q.bias" in f.tensors}
    elif mt == "glm4_moe":
        raw |= {"n_routed_experts": experts, "moe_intermediate_size": expert_ff, "intermediate_size": ff or expert_ff,
                "partial_rotary_factor": key("rope.dimension_count") / raw["head_dim"],
                "attention_bias": "blk.0.attn_q.bias" in f.tensors, "use_qk_norm": "blk.0.attn_q_norm.weight" in f.tensors,
                "first_k_dense_replace": key("leading_dense_block_count", 0),
                "n_shared_experts": key("expert_shared_count", 0),
                "routed_scaling_factor": number("expert_weights_scale", 1.0) or 1.0,
                "norm_topk_prob": bool(key("expert_weights_norm", False, "a bool or an integer")),
                "n_group": key("expert_group_count", 1) or 1, "topk_group": key("expert_group_used_count", 1) or 1}
    elif mt == "minimax_m2":
        raw |= {"num_local_experts": experts, "intermediate_size": expert_ff or ff,
                "rotary_dim": key("rope.dimension_count")}
    elif mt in ("deepseek_v2", "deepseek_v3"):
        rope = key("rope.dimension_count")
        kv_rank = key("attention.kv_lora_rank")
        k_mla, v_mla = key("attention.key_length_mla", None), key("attention.value_length_mla", None)
        if k_mla is None:  # older converters: key/value_length are the per-head sizes
            k_mla, v_mla = key("attention.key_length"), key("attention.value_length")
        groups = key("expert_group_count", 1) or 1
        raw |= {"n_routed_experts": experts, "moe_intermediate_size": expert_ff, "intermediate_size": ff or expert_ff,
                "kv_lora_rank": kv_rank, "q_lora_rank": key("attention.q_lora_rank", None) or None,
                "qk_rope_head_dim": rope, "qk_nope_head_dim": k_mla - rope, "v_head_dim": v_mla,
                "head_dim": None, "num_key_value_heads": heads,
                "first_k_dense_replace": key("leading_dense_block_count", 0),
                "n_shared_experts": key("expert_shared_count", 0),
                "routed_scaling_factor": number("expert_weights_scale", 1.0) or 1.0,
                "norm_topk_prob": bool(key("expert_weights_norm", False, "a bool or an integer")),
                "topk_method": "group_limited_greedy" if groups > 1 else "greedy",
                "n_group": groups, "topk_group": key("expert_group_used_count", 1) or 1}
        if mt == "deepseek_v3":  # GLM-4.7-Flash's converter writes no leading_dense_block_count: count them
            raw |= {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "first_k_dense_replace": next(
                (i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in f.tensors), layers)}
        elif key("expert_gating_func", 1) not in (0, 1):  # 1: softmax (V2); 2: sigmoid (V3)
            raw["scoring_func"] = "sigmoid"
    elif mt == "llama4_text":
        raw |= llama4_keys(f, key, experts, expert_ff, ff, window, raw)
    scaling = key("rope.scaling.type", None, "a string")
    if scaling == "yarn":
        log_mul = number("rope.scaling.yarn_log_multiplier", 0.0)
        raw["rope_scaling"] = {
            "rope_type": "yarn", "factor": number("rope.scaling.factor"),
            "original_max_position_embeddings": key("rope.scaling.original_context_length"),
            "beta_fast": number("rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": number("rope.scaling.yarn_beta_slow", 1.0),
            "mscale": log_mul / 0.1 if log_mul else None, "mscale_all_dim": log_mul / 0.1 if log_mul else None}
    elif scaling not in (None, "none"):
        raise OffloadMoeError(f"{f.path}: {arch}.rope.scaling.type = {scaling!r} is not supported "
                              "(supported: none, yarn)")
    return {k: v for k, v in raw.items() if v is not None}


def llama4_keys(f: GGUFFile, key, experts: int, expert_ff, ff, window, raw: dict) -> dict:
    """llama4's config.json keys. llama.cpp fixes in code (src/models/llama4.cpp) what Meta's config
    says: chunks of 8192 positions on the RoPE layers, every 4th layer NoPE with the temperature of
    floor_scale 8192 and attn_scale 0.1, L2 q/k norms unless there are 128 experts (Maverick);
    `attention.sliding_window` = 0 turns chunks off. The converter writes llama3 RoPE scaling as
    the per-frequency divisors of `rope_freqs.weight`."""
    layers = raw["num_hidden_layers"]
    chunked = window != 0
    keys = {"num_local_experts": experts, "intermediate_size": expert_ff, "intermediate_size_mlp": ff,
            "interleave_moe_layer_step": key("interleave_moe_layer_step", 1),
            "head_dim": key("rope.dimension_count", raw["head_dim"]), "use_qk_norm": experts != 128,
            "no_rope_layers": [int((i + 1) % (4 if chunked else layers) != 0) for i in range(layers)],
            "attention_chunk_size": 8192 if chunked else None, "attn_temperature_tuning": chunked,
            "floor_scale": 8192, "attn_scale": 0.1}
    factors = f.tensors.get("rope_freqs.weight")
    if factors is not None:
        half = keys["head_dim"] // 2
        if factors.type != 0 or factors.shape != (half,):  # ggml F32
            raise OffloadMoeError(f"{factors.file}: tensor 'rope_freqs.weight' is ggml type {factors.type} of shape "
                                  f"{list(factors.shape)}, expected F32 [{half}] (one divisor per RoPE frequency)")
        keys["rope_scaling"] = {"rope_type": "freq_factors", "factors": [float(x) for x in factors.data]}
    return keys
