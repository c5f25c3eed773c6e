"""Reading a family's `config.json`: typed keys with one-line errors (`ConfigReader`) and the fields
every family reads the same way (`common_fields`). Each family's file in `arch/` turns these into
the keyword arguments of `config.ModelConfig`; nothing here knows a family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...base.errors import OffloadMoeError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Upper bounds far above any published model, so a corrupt or hostile config.json fails here
# instead of sizing loops and tables by a count of 10**9.
LIMITS = {"num_hidden_layers": 4096, "vocab_size": 2**24, "hidden_size": 2**20, "intermediate_size": 2**22,
          "moe_intermediate_size": 2**22, "shared_expert_intermediate_size": 2**22, "num_attention_heads": 2**14,
          "num_key_value_heads": 2**14, "head_dim": 2**14, "num_local_experts": 2**16, "num_experts": 2**16,
          "n_routed_experts": 2**16, "num_experts_per_tok": 2**16, "experts_per_token": 2**16,
          "max_position_embeddings": 2**31, "sliding_window": 2**31, "kv_lora_rank": 2**16, "q_lora_rank": 2**16,
          "qk_nope_head_dim": 2**14, "qk_rope_head_dim": 2**14, "v_head_dim": 2**14, "n_shared_experts": 2**10,
          "first_k_dense_replace": 4096, "moe_layer_freq": 4096, "decoder_sparse_step": 4096,
          "max_window_layers": 4096, "n_group": 2**16, "topk_group": 2**16,
          "original_max_position_embeddings": 2**31, "linear_num_key_heads": 2**14, "linear_num_value_heads": 2**14,
          "linear_key_head_dim": 2**14, "linear_value_head_dim": 2**14, "linear_conv_kernel_dim": 64,
          "full_attention_interval": 4096, "intermediate_size_mlp": 2**22, "attention_chunk_size": 2**31,
          "interleave_moe_layer_step": 4096, "no_rope_layer_interval": 4096}


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2): keys and values are decompressed per head from a
    kv_lora_rank latent shared by all heads; each query/key head is a no-RoPE part and a RoPE part."""
    kv_lora_rank: int
    q_lora_rank: int | None       # None: queries come from one q_proj, not a low-rank pair
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class LinearAttention:
    """Gated DeltaNet token mixing (Qwen3-Next, Qwen3.5): a causal depthwise convolution over the
    projected q, k, v and a gated delta-rule recurrence whose state is one (dk, dv) matrix per value
    head: a fixed size per sequence, whatever its length."""
    num_key_heads: int            # nk: query/key heads; each serves nv / nk value heads
    num_value_heads: int          # nv
    key_head_dim: int             # dk
    value_head_dim: int           # dv
    conv_kernel: int              # K: the convolution's width; it keeps the last K - 1 inputs
    projections: str = "split"    # "grouped": in_proj_qkvz / in_proj_ba by key head (Qwen3-Next's checkpoints);
                                  # "split": in_proj_qkv, _z, _b, _a (Qwen3.5's, and every GGUF file's)

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: q, k and v side by side."""
        return 2 * self.key_dim + self.value_dim

    def state_elements(self) -> tuple[int, int]:
        """(convolution state, recurrent state) elements of one sequence in one layer."""
        return self.conv_dim * (self.conv_kernel - 1), self.num_value_heads * self.key_head_dim * self.value_head_dim


class ConfigReader:
    """Typed access to config.json keys with one-line errors naming the file and key."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def fail(self, key: str, expected: str):
        shown = repr(self.raw.get(key))
        shown = shown if len(shown) <= 60 else shown[:40] + f"... ({len(shown)} characters)"
        raise OffloadMoeError(f"{self.source}: key {key!r} = {shown}, expected {expected}")

    def int(self, key: str, default: Any = ..., minimum: int = 1) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if default is ...:
                raise OffloadMoeError(f"{self.source}: missing key {key!r} (expected an integer)")
            return default
        v = self.raw[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.fail(key, f"an integer >= {minimum}")
        if v > LIMITS.get(key, 2**31):
            self.fail(key, f"an integer in {minimum}..{LIMITS.get(key, 2**31)} (larger is no real model)")
        return v

    def float(self, key: str, default: float) -> float:
        v = self.raw.get(key, default)
        if v is None:
            return default
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or v > 1e300
                or not math.isfinite(v)):
            self.fail(key, "a positive finite number")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.raw.get(key, default)
        if not isinstance(v, bool):
            self.fail(key, "true or false")
        return v

    def token_ids(self, key: str) -> tuple[int, ...]:
        v = self.raw.get(key)
        if v is None:
            return ()
        ids = v if isinstance(v, list) else [v]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            self.fail(key, "a token id or a list of token ids")
        return tuple(ids)

    def dtype(self) -> str:
        v = self.raw.get("torch_dtype") or self.raw.get("dtype") or "bfloat16"
        if not isinstance(v, str) or v not in DTYPE_BYTES:
            self.fail("torch_dtype", f"one of {', '.join(DTYPE_BYTES)}")
        return v

    def first(self, *keys: str) -> str:
        """The first of several spellings of one key that the file has (else the first)."""
        return next((k for k in keys if self.raw.get(k) is not None), keys[0])

    def rope(self) -> tuple[float, dict[str, Any] | None]:
        """(rope_theta, YaRN or llama3 parameters or None), from transformers >= 5's nested `rope_parameters`
        or the older `rope_theta` + `rope_scaling`."""
        params = self.raw.get("rope_parameters")  # transformers >= 5 nests it
        if isinstance(params, dict) and "rope_theta" in params:
            theta, scaling = ConfigReader(params, self.source).float("rope_theta", 1e6), params
        else:
            theta, scaling = self.float("rope_theta", 1e6), self.raw.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            self.fail("rope_scaling", "an object or null")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            return theta, None
        y = ConfigReader(scaling, self.source)
        if rope_type == "freq_factors":  # a GGUF's rope_freqs tensor (llama.cpp): each frequency's divisor
            factors = scaling.get("factors")
            if not isinstance(factors, list) or not all(isinstance(v, float) and 0 < v < 1e30 for v in factors):
                y.fail("factors", "a list of positive numbers")
            return theta, {"rope_type": "freq_factors", "factors": tuple(factors)}
        if rope_type == "llama3":  # Llama 3.1 / 4: low frequencies divided by factor, a smooth ramp between
            return theta, {"rope_type": "llama3", "factor": y.float("factor", None) or y.fail("factor", "a number > 0"),
                           "low_freq_factor": y.float("low_freq_factor", 1.0),
                           "high_freq_factor": y.float("high_freq_factor", 4.0),
                           "original_max_position_embeddings": y.int("original_max_position_embeddings")}
        if rope_type != "yarn":
            raise OffloadMoeError(f"{self.source}: rope_type {rope_type!r} is not supported "
                                  "(supported: default, yarn, llama3)")
        keys = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")
        yarn = {k: y.float(k, None) if scaling.get(k) != 0 else None for k in keys} | {  # 0 means unset
            "original_max_position_embeddings": y.int("original_max_position_embeddings"),
            "truncate": y.bool("truncate", True)}
        if yarn["factor"] is None:
            y.fail("factor", "a positive number")
        return theta, yarn

    def sliding(self) -> int | None:
        """Qwen configs carry a sliding_window that only applies with use_sliding_window."""
        return self.int("sliding_window", None) if self.bool("use_sliding_window", False) else None


def rotary_dim(r: ConfigReader, head_dim: int, default: float) -> int:
    """How many dims of each head RoPE rotates: `partial_rotary_factor` (top level, or in transformers
    5's `rope_parameters`) times head_dim, or MiniMax's `rotary_dim`; -> an even count in 2..head_dim."""
    if r.raw.get("rotary_dim") is not None:
        dims, key = r.int("rotary_dim"), "rotary_dim"
    else:
        params = r.raw.get("rope_parameters")
        inner = isinstance(params, dict) and params.get("partial_rotary_factor") is not None
        source = ConfigReader(params, r.source) if inner else r
        factor = source.float("partial_rotary_factor", default)
        dims, key = int(head_dim * factor), "partial_rotary_factor"
    if dims % 2 or not 2 <= dims <= head_dim:
        r.fail(key, f"rotating an even number of dims in 2..head_dim ({head_dim})")
    return dims


def common_fields(r: ConfigReader, *, experts: str, intermediate: str = "intermediate_size",
            head_dim: int | None = None) -> dict[str, Any]:
    """The fields every family reads the same way; `experts` / `intermediate` name the keys for
    the number of routed experts and their hidden width."""
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    kv_heads = r.int("num_key_value_heads", heads)
    if heads % kv_heads:
        r.fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
    num_experts = r.int(experts)
    top_k_key = r.first("num_experts_per_tok", "experts_per_token")
    top_k = r.int(top_k_key)
    if top_k > num_experts:
        r.fail(top_k_key, f"at most {experts} ({num_experts})")
    if r.raw.get("hidden_act", "silu") != "silu":
        r.fail("hidden_act", "'silu'")
    theta, yarn = r.rope()
    bos = r.raw.get("bos_token_id")
    return dict(
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.int(intermediate),
        num_layers=r.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim or r.int("head_dim", hidden // heads),
        num_experts=num_experts,
        top_k=top_k,
        rms_norm_eps=r.float("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=yarn,
        max_position_embeddings=r.int("max_position_embeddings", 32768),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=r.token_ids("eos_token_id"),
        torch_dtype=r.dtype(),
        quantization=r.raw.get("quantization_config"),
    )


def dense_layers(r: ConfigReader, num_layers: int, dense: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Check that the dense layers leave at least one MoE layer, and say which key chose them."""
    dense = tuple(sorted(set(dense)))
    if len(dense) >= num_layers:
        raise OffloadMoeError(f"{r.source}: every one of the {num_layers} layers is dense (no MoE layer): "
                              "this is not a mixture-of-experts model")
    return dense


def qwen_dense_layers(r: ConfigReader, num_layers: int) -> tuple[int, ...]:
    """Qwen: a layer is dense if listed in mlp_only_layers or not a multiple of decoder_sparse_step."""
    step = r.int("decoder_sparse_step", 1)
    only = r.raw.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and 0 <= i < num_layers for i in only):
        r.fail("mlp_only_layers", f"a list of layer indices below {num_layers}")
    return dense_layers(r, num_layers, [i for i in range(num_layers) if i in only or (i + 1) % step])


def layer_types(r: ConfigReader, types, num_layers: int,
                kinds: tuple[str, ...] = ("sliding_attention", "full_attention")) -> tuple[str, ...]:
    if types and (not isinstance(types, (list, tuple)) or len(types) != num_layers or
                  any(t not in kinds for t in types)):
        r.fail("layer_types", f"a list of {num_layers} entries, each one of {', '.join(kinds)}")
    return tuple(types)


def mla_fields(r: ConfigReader, *expert_keys: str) -> tuple[MLA, dict]:
    """The latent attention's sizes and the common fields of a DeepSeek-style config (DeepSeek-V2/V3,
    Kimi-K2, GLM-4.7-Flash): head_dim is the nope and rope parts together, and every head has its own
    key and value (decompressed from the latent)."""
    mla = MLA(kv_lora_rank=r.int("kv_lora_rank"), q_lora_rank=r.int("q_lora_rank", None),
              qk_nope_head_dim=r.int("qk_nope_head_dim"), qk_rope_head_dim=r.int("qk_rope_head_dim"),
              v_head_dim=r.int("v_head_dim"))
    c = common_fields(r, experts=r.first(*expert_keys), intermediate="moe_intermediate_size",
                      head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    c["num_kv_heads"] = c["num_heads"]  # MLA decompresses a key and a value for every head
    return mla, c
