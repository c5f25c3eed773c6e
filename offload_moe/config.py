"""One frozen description of a model, built once from `config.json` and passed down.

Everything else (checkpoint reader, model, expert engine, planner) reads sizes from here and never
re-reads JSON. Parameter and byte counts live here too, because the planner needs them before any
weights exist. An architecture differs only by how its `config.json` maps onto these fields
(`_PARSERS`); the model code is shared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OffloadMoeError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int            # H: width of the residual stream
    intermediate_size: int      # I: hidden width of one expert MLP
    num_layers: int
    num_heads: int
    num_kv_heads: int           # grouped-query attention: heads share K/V in groups
    head_dim: int
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

    # ---- parameter counts (what the planner and `info` report) ----
    @property
    def params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # w1, w3: [I, H]; w2: [H, I]

    @property
    def attention_params_per_layer(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        return q + kv + o

    @property
    def router_params_per_layer(self) -> int:
        return self.num_experts * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus lm_head (counted once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def expert_params(self) -> int:
        return self.num_layers * self.num_experts * self.params_per_expert

    @property
    def shared_params(self) -> int:
        """Everything that is not a routed expert: it stays on the compute device."""
        return (self.num_layers * (self.attention_params_per_layer + self.router_params_per_layer)
                + self.norm_params + self.embedding_params)

    @property
    def total_params(self) -> int:
        return self.shared_params + self.expert_params

    @property
    def active_params(self) -> int:
        return self.shared_params + self.num_layers * self.top_k * self.params_per_expert

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    # ---- construction ----
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        parser = _PARSERS.get(model_type)
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
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OffloadMoeError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise OffloadMoeError(f"{file}: expected a JSON object at the top level")
        return cls.from_dict(raw, str(file))


class _Reader:
    """Typed access to config.json keys with one-line errors naming the file and key."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def _fail(self, key: str, expected: str):
        raise OffloadMoeError(f"{self.source}: key {key!r} = {self.raw.get(key)!r}, expected {expected}")

    def int(self, key: str, default: Any = ..., minimum: int = 1) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if default is ...:
                raise OffloadMoeError(f"{self.source}: missing key {key!r} (expected an integer)")
            return default
        v = self.raw[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self._fail(key, f"an integer >= {minimum}")
        return v

    def float(self, key: str, default: float) -> float:
        v = self.raw.get(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            self._fail(key, "a positive number")
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
        if v not in DTYPE_BYTES:
            self._fail("torch_dtype", f"one of {', '.join(DTYPE_BYTES)}")
        return v

    def rope_theta(self) -> float:
        params = self.raw.get("rope_parameters")  # transformers >= 5 nests it
        if isinstance(params, dict) and "rope_theta" in params:
            rope_type = params.get("rope_type", "default")
            if rope_type != "default":
                raise OffloadMoeError(f"{self.source}: rope_type {rope_type!r} is not supported "
                                      "(supported: default)")
            return _Reader(params, self.source).float("rope_theta", 1e6)
        return self.float("rope_theta", 1e6)


def _parse_mixtral(r: _Reader) -> ModelConfig:
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    kv_heads = r.int("num_key_value_heads", heads)
    if heads % kv_heads:
        r._fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
    head_dim = r.int("head_dim", hidden // heads)
    experts = r.int("num_local_experts")
    top_k = r.int("num_experts_per_tok")
    if top_k > experts:
        r._fail("num_experts_per_tok", f"at most num_local_experts ({experts})")
    if r.raw.get("hidden_act", "silu") != "silu":
        r._fail("hidden_act", "'silu'")
    vocab = r.int("vocab_size")
    bos = r.raw.get("bos_token_id")
    return ModelConfig(
        model_type="mixtral",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=r.int("intermediate_size"),
        num_layers=r.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_experts=experts,
        top_k=top_k,
        rms_norm_eps=r.float("rms_norm_eps", 1e-5),
        rope_theta=r.rope_theta(),
        max_position_embeddings=r.int("max_position_embeddings", 32768),
        sliding_window=r.int("sliding_window", None),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=r.token_ids("eos_token_id"),
        torch_dtype=r.dtype(),
        quantization=r.raw.get("quantization_config"),
    )


_PARSERS = {"mixtral": _parse_mixtral}
SUPPORTED_MODEL_TYPES = tuple(sorted(_PARSERS))
