"""One frozen description of a model, built once from `config.json` and passed down.

Everything else (checkpoint reader, model, expert engine, planner) reads sizes from here and never
re-reads JSON. Parameter and byte counts live here too, because the planner needs them before any
weights exist. An architecture differs only by how its `config.json` maps onto these fields
(`_PARSERS`); the model code is shared.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arch import attention_shapes, family_of
from .errors import OffloadMoeError
from .user_files import regular_file

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


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
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int            # H: width of the residual stream
    intermediate_size: int      # I: hidden width of one expert MLP
    num_layers: int
    num_heads: int
    num_kv_heads: int           # grouped-query attention: heads share K/V in groups
    head_dim: int               # query/key width per head (MLA: no-RoPE + RoPE parts)
    num_experts: int            # E: routed experts per MoE layer
    top_k: int                  # k: experts used per token
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None   # attend to at most this many most recent positions
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"       # dtype the checkpoint stores dense weights in
    quantization: dict[str, Any] | None = field(default=None, compare=False)
    # ---- where families differ, as config.json says (defaults: Mixtral) ----
    dense_layers: tuple[int, ...] = ()  # layers whose MLP is one dense SwiGLU on the device, no experts
    dense_intermediate_size: int = 0    # hidden width of those dense MLPs
    shared_expert_size: int = 0         # hidden width of the shared expert every token also uses (0: none)
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None       # clamp q, k, v to [-clip_qkv, clip_qkv] (OLMoE)
    norm_topk_prob: bool = True         # renormalise the top-k router weights to sum to 1 ...
    routed_scaling_factor: float = 1.0  # ... or else scale them by this
    n_group: int = 1                    # group-limited routing: experts in n_group groups, the best
    topk_group: int = 1                 # topk_group groups (by their best expert) are eligible
    layer_types: tuple[str, ...] = ()   # per layer "sliding_attention" / "full_attention"; (): all alike
    swiglu_limit: float | None = None   # clamped SwiGLU of gpt-oss: the clamp, and the sigmoid's alpha
    swiglu_alpha: float = 1.702
    mla: MLA | None = None
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False)  # YaRN parameters

    # ---- layers ----
    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the layers with routed experts; the expert engine numbers them 0, 1, ..."""
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - len(self.dense_layers)

    def window(self, layer: int) -> int | None:
        """The sliding window of one layer's attention (None: it sees every earlier position)."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def rope_dim(self) -> int:
        """How many dimensions of each query/key head are rotated."""
        return self.mla.qk_rope_head_dim if self.mla else self.head_dim

    @property
    def family(self):
        """The architecture adapter (`arch.Family`): tensor names and model options."""
        return family_of(self.model_type)

    # ---- parameter counts (what the planner and `info` report) ----
    @property
    def params_per_expert(self) -> int:
        n = 3 * self.hidden_size * self.intermediate_size  # w1, w3: [I, H]; w2: [H, I]
        if self.family.expert_bias:
            n += 2 * self.intermediate_size + self.hidden_size
        return n

    @property
    def attention_params_per_layer(self) -> int:
        """Projections, their biases, q/k norms, sinks; MLA's low-rank pairs and latent norm."""
        return sum(math.prod(s) for s in attention_shapes(self, self.family).values())

    @property
    def router_params_per_layer(self) -> int:
        """Per MoE layer."""
        return self.num_experts * (self.hidden_size + self.family.router_bias)

    @property
    def shared_expert_params_per_layer(self) -> int:
        """Per MoE layer: the shared expert and its gate, if any."""
        if not self.shared_expert_size:
            return 0
        return 3 * self.hidden_size * self.shared_expert_size + self.hidden_size * self.family.shared_expert_gate

    @property
    def dense_mlp_params_per_layer(self) -> int:
        """Per dense layer."""
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def norm_params(self) -> int:
        """The two RMSNorms of every layer and the final one (q/k norms count as attention)."""
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus lm_head (counted once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def expert_params(self) -> int:
        return self.num_moe_layers * self.num_experts * self.params_per_expert

    @property
    def device_mlp_params(self) -> int:
        """Dense MLP layers and shared experts: MLP weights that stay on the compute device."""
        return (len(self.dense_layers) * self.dense_mlp_params_per_layer
                + self.num_moe_layers * self.shared_expert_params_per_layer)

    @property
    def shared_params(self) -> int:
        """Everything that is not a routed expert: it stays on the compute device."""
        return (self.num_layers * self.attention_params_per_layer
                + self.num_moe_layers * self.router_params_per_layer
                + self.device_mlp_params + self.norm_params + self.embedding_params)

    @property
    def total_params(self) -> int:
        return self.shared_params + self.expert_params

    @property
    def active_params(self) -> int:
        return self.shared_params + self.num_moe_layers * self.top_k * self.params_per_expert

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        if self.mla:  # the latent and the rotated rope key, shared by all heads
            return self.num_layers * (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim) * dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    # ---- construction ----
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        parser = _PARSERS.get(model_type) if isinstance(model_type, str) else None
        if parser is None:
            supported = ", ".join(sorted(_PARSERS))
            raise OffloadMoeError(f"{source}: model_type {model_type!r} is not supported "
                                  f"(supported: {supported})")
        return parser(_Reader(raw, source))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Read a `config.json` file, or the one inside a checkpoint directory."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise OffloadMoeError(f"{file}: not found (expected a Hugging Face config.json)")
        regular_file(file, "config.json")
        try:
            raw = json.loads(file.read_bytes().decode("utf-8"))
        except OSError as e:
            raise OffloadMoeError(f"{file}: cannot read ({e.strerror})") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise OffloadMoeError(f"{file}: not valid UTF-8 JSON ({str(e)[:200]})") from None
        if not isinstance(raw, dict):
            raise OffloadMoeError(f"{file}: expected a JSON object at the top level")
        return cls.from_dict(raw, str(file))


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
          "original_max_position_embeddings": 2**31}


class _Reader:
    """Typed access to config.json keys with one-line errors naming the file and key."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def _fail(self, key: str, expected: str):
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
            self._fail(key, f"an integer >= {minimum}")
        if v > LIMITS.get(key, 2**31):
            self._fail(key, f"an integer in {minimum}..{LIMITS.get(key, 2**31)} (larger is no real model)")
        return v

    def float(self, key: str, default: float) -> float:
        v = self.raw.get(key, default)
        if v is None:
            return default
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or v > 1e300
                or not math.isfinite(v)):
            self._fail(key, "a positive finite number")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.raw.get(key, default)
        if not isinstance(v, bool):
            self._fail(key, "true or false")
        return v

    def token_ids(self, key: str) -> tuple[int, ...]:
        v = self.raw.get(key)
        if v is None:
            return ()
        ids = v if isinstance(v, list) else [v]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            self._fail(key, "a token id or a list of token ids")
        return tuple(ids)

    def dtype(self) -> str:
        v = self.raw.get("torch_dtype") or self.raw.get("dtype") or "bfloat16"
        if not isinstance(v, str) or v not in DTYPE_BYTES:
            self._fail("torch_dtype", f"one of {', '.join(DTYPE_BYTES)}")
        return v

    def first(self, *keys: str) -> str:
        """The first of several spellings of one key that the file has (else the first)."""
        return next((k for k in keys if self.raw.get(k) is not None), keys[0])

    def rope(self) -> tuple[float, dict[str, Any] | None]:
        """(rope_theta, YaRN parameters or None), from transformers >= 5's nested `rope_parameters`
        or the older `rope_theta` + `rope_scaling`."""
        params = self.raw.get("rope_parameters")  # transformers >= 5 nests it
        if isinstance(params, dict) and "rope_theta" in params:
            theta, scaling = _Reader(params, self.source).float("rope_theta", 1e6), params
        else:
            theta, scaling = self.float("rope_theta", 1e6), self.raw.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            self._fail("rope_scaling", "an object or null")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            return theta, None
        if rope_type != "yarn":
            raise OffloadMoeError(f"{self.source}: rope_type {rope_type!r} is not supported "
                                  "(supported: default, yarn)")
        y = _Reader(scaling, self.source)
        keys = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")
        yarn = {k: y.float(k, None) if scaling.get(k) != 0 else None for k in keys} | {  # 0 means unset
            "original_max_position_embeddings": y.int("original_max_position_embeddings"),
            "truncate": y.bool("truncate", True)}
        if yarn["factor"] is None:
            y._fail("factor", "a positive number")
        return theta, yarn

    def sliding(self) -> int | None:
        """Qwen configs carry a sliding_window that only applies with use_sliding_window."""
        return self.int("sliding_window", None) if self.bool("use_sliding_window", False) else None


def _common(r: _Reader, *, experts: str, intermediate: str = "intermediate_size",
            head_dim: int | None = None) -> dict[str, Any]:
    """The fields every family reads the same way; `experts` / `intermediate` name the keys for
    the number of routed experts and their hidden width."""
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    kv_heads = r.int("num_key_value_heads", heads)
    if heads % kv_heads:
        r._fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
    num_experts = r.int(experts)
    top_k_key = r.first("num_experts_per_tok", "experts_per_token")
    top_k = r.int(top_k_key)
    if top_k > num_experts:
        r._fail(top_k_key, f"at most {experts} ({num_experts})")
    if r.raw.get("hidden_act", "silu") != "silu":
        r._fail("hidden_act", "'silu'")
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


def _dense_layers(r: _Reader, num_layers: int, dense: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Check that the dense layers leave at least one MoE layer, and say which key chose them."""
    dense = tuple(sorted(set(dense)))
    if len(dense) >= num_layers:
        raise OffloadMoeError(f"{r.source}: every one of the {num_layers} layers is dense (no MoE layer): "
                              "this is not a mixture-of-experts model")
    return dense


def _qwen_dense_layers(r: _Reader, num_layers: int) -> tuple[int, ...]:
    """Qwen: a layer is dense if listed in mlp_only_layers or not a multiple of decoder_sparse_step."""
    step = r.int("decoder_sparse_step", 1)
    only = r.raw.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and 0 <= i < num_layers for i in only):
        r._fail("mlp_only_layers", f"a list of layer indices below {num_layers}")
    return _dense_layers(r, num_layers, [i for i in range(num_layers) if i in only or (i + 1) % step])


def _parse_mixtral(r: _Reader) -> ModelConfig:
    return ModelConfig(model_type="mixtral", **_common(r, experts="num_local_experts"),
                       sliding_window=r.int("sliding_window", None))


def _parse_qwen3_moe(r: _Reader) -> ModelConfig:
    c = _common(r, experts=r.first("num_experts", "num_local_experts"), intermediate="moe_intermediate_size")
    return ModelConfig(model_type="qwen3_moe", **c, sliding_window=r.sliding(),
                       dense_layers=_qwen_dense_layers(r, c["num_layers"]),
                       dense_intermediate_size=r.int("intermediate_size"),
                       qkv_bias=r.bool("attention_bias", False), o_bias=r.bool("attention_bias", False),
                       norm_topk_prob=r.bool("norm_topk_prob", False))


def _parse_olmoe(r: _Reader) -> ModelConfig:
    c = _common(r, experts=r.first("num_experts", "num_local_experts"))
    if c["head_dim"] * c["num_heads"] != c["hidden_size"]:
        r._fail("head_dim", "hidden_size / num_attention_heads (OLMoE's q/k norms span hidden_size)")
    return ModelConfig(model_type="olmoe", **c, qkv_bias=r.bool("attention_bias", False),
                       o_bias=r.bool("attention_bias", False), clip_qkv=r.float("clip_qkv", None),
                       norm_topk_prob=r.bool("norm_topk_prob", False))


def _parse_qwen2_moe(r: _Reader) -> ModelConfig:
    c = _common(r, experts=r.first("num_experts", "num_local_experts"), intermediate="moe_intermediate_size")
    L = c["num_layers"]
    window, types = r.sliding(), ()
    if window is not None:  # transformers' rule when config.json has no layer_types
        types = r.raw.get("layer_types") or ["sliding_attention" if (i + 1) % 2 and i < r.int("max_window_layers", 28)
                                             else "full_attention" for i in range(L)]
    return ModelConfig(model_type="qwen2_moe", **c, sliding_window=window, layer_types=_layer_types(r, types, L),
                       dense_layers=_qwen_dense_layers(r, L), dense_intermediate_size=r.int("intermediate_size"),
                       shared_expert_size=r.int("shared_expert_intermediate_size", 0, minimum=0),
                       qkv_bias=r.bool("qkv_bias", True), norm_topk_prob=r.bool("norm_topk_prob", False))


def _parse_deepseek_v2(r: _Reader) -> ModelConfig:
    mla = MLA(kv_lora_rank=r.int("kv_lora_rank"), q_lora_rank=r.int("q_lora_rank", None),
              qk_nope_head_dim=r.int("qk_nope_head_dim"), qk_rope_head_dim=r.int("qk_rope_head_dim"),
              v_head_dim=r.int("v_head_dim"))
    c = _common(r, experts=r.first("n_routed_experts", "num_experts"), intermediate="moe_intermediate_size",
                head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    c["num_kv_heads"] = c["num_heads"]  # MLA decompresses a key and a value for every head
    L, method = c["num_layers"], r.raw.get("topk_method", "greedy")
    if r.raw.get("scoring_func", "softmax") != "softmax":
        r._fail("scoring_func", "'softmax' (DeepSeek-V2)")
    if method not in ("greedy", "group_limited_greedy"):
        r._fail("topk_method", "'greedy' or 'group_limited_greedy'")
    n_group, topk_group = (r.int("n_group"), r.int("topk_group")) if method == "group_limited_greedy" else (1, 1)
    if c["num_experts"] % n_group or topk_group > n_group:
        r._fail("n_group", f"a divisor of the {c['num_experts']} experts, with topk_group <= n_group")
    first, freq = r.int("first_k_dense_replace", 0, minimum=0), r.int("moe_layer_freq", 1)
    if r.bool("attention_bias", False) or r.bool("mlp_bias", False):
        r._fail("attention_bias" if r.raw.get("attention_bias") else "mlp_bias", "false (biases are not supported)")
    return ModelConfig(model_type="deepseek_v2", **c, mla=mla,
                       dense_layers=_dense_layers(r, L, [i for i in range(L) if i < first or i % freq]),
                       dense_intermediate_size=r.int("intermediate_size"),
                       shared_expert_size=c["intermediate_size"] * r.int("n_shared_experts", 0, minimum=0),
                       norm_topk_prob=r.bool("norm_topk_prob", False),
                       routed_scaling_factor=r.float("routed_scaling_factor", 1.0),
                       n_group=n_group, topk_group=topk_group)


def _parse_gpt_oss(r: _Reader) -> ModelConfig:
    c = _common(r, experts=r.first("num_local_experts", "num_experts"))
    bias = r.bool("attention_bias", True)
    return ModelConfig(model_type="gpt_oss", **c, sliding_window=r.int("sliding_window", None),
                       layer_types=_layer_types(r, r.raw.get("layer_types") or (), c["num_layers"]),
                       qkv_bias=bias, o_bias=bias, norm_topk_prob=False,
                       swiglu_limit=r.float("swiglu_limit", 7.0), swiglu_alpha=r.float("swiglu_alpha", 1.702))


def _layer_types(r: _Reader, types, num_layers: int) -> tuple[str, ...]:
    kinds = ("sliding_attention", "full_attention")
    if types and (not isinstance(types, (list, tuple)) or len(types) != num_layers or
                  any(t not in kinds for t in types)):
        r._fail("layer_types", f"a list of {num_layers} entries, each one of {', '.join(kinds)}")
    return tuple(types)


_PARSERS = {"mixtral": _parse_mixtral, "qwen3_moe": _parse_qwen3_moe, "olmoe": _parse_olmoe,
            "qwen2_moe": _parse_qwen2_moe, "deepseek_v2": _parse_deepseek_v2, "gpt_oss": _parse_gpt_oss}
SUPPORTED_MODEL_TYPES = tuple(sorted(_PARSERS))
