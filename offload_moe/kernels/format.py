"""The quantized checkpoint format offload_moe writes and reads.

A quantized checkpoint is a normal checkpoint directory whose `config.json` carries

    "quantization_config": {"quant_method": "offload_moe", "format_version": 1, "group_size": 64,
                            "method": "hqq", "experts": "int3", "attention": "int4", "embeddings": "bf16"}

Each tensor kind has its own setting: `int2`/`int3`/`int4`/`int8` (groupwise, packed) or a float
dtype `bf16`/`fp16`/`fp32` (stored as is). A quantized weight `X.weight` [out, in] is stored as
`X.qweight` (uint8 [out, ceil(in·bits/8)]), `X.scales` and `X.zeros` (fp16 [out, in/group_size]).
Experts are always written in the per-expert layout. Norms and routers are never quantized: they
are small and routing decisions are sensitive to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base.errors import OffloadMoeError
from .groupwise import METHODS

KINDS = ("experts", "attention", "embeddings")
INT_SETTINGS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}
FLOAT_SETTINGS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SETTINGS = (*INT_SETTINGS, *FLOAT_SETTINGS)
FORMAT_VERSION = 1


def tensor_kind(name: str) -> str | None:
    """Which setting a checkpoint weight follows; None for tensors never quantized (norms anywhere,
    e.g. Qwen3's per-head q_norm or DeepSeek's q_a_layernorm, are 1-D and stay as stored)."""
    if name.endswith("norm.weight"):
        return None
    if ".experts." in name:
        return "experts"
    if ".self_attn." in name:
        return "attention"
    if name.startswith(("model.embed_tokens.", "lm_head.")):
        return "embeddings"
    return None


def check_setting(kind: str, value: str, source: str = "argument") -> str:
    if value not in SETTINGS:
        raise OffloadMoeError(f"{source}: {kind} = {value!r} is not a known width "
                              f"(expected one of {', '.join(SETTINGS)})")
    return value


@dataclass(frozen=True)
class QuantSpec:
    settings: dict            # kind -> "int4" / "bf16" ...
    group_size: int = 64
    method: str = "hqq"

    def bits(self, kind: str | None) -> int | None:
        """Bits of a kind's quantized weights, or None when it is stored as floats."""
        return INT_SETTINGS.get(self.settings.get(kind)) if kind else None

    def to_config(self) -> dict:
        return {"quant_method": "offload_moe", "format_version": FORMAT_VERSION, "group_size": self.group_size,
                "method": self.method, **self.settings}

    @classmethod
    def from_config(cls, raw: dict | None, source: str) -> "QuantSpec | None":
        if raw is None:
            return None
        if not isinstance(raw, dict) or raw.get("quant_method") != "offload_moe":
            method = raw.get("quant_method") if isinstance(raw, dict) else raw
            raise OffloadMoeError(f"{source}: quantization_config.quant_method {method!r} is not supported "
                                  "(expected 'offload_moe'; quantize the original checkpoint with offload-moe quantize)")
        if raw.get("format_version") != FORMAT_VERSION:
            raise OffloadMoeError(f"{source}: quantization_config.format_version {raw.get('format_version')!r}, "
                                  f"expected {FORMAT_VERSION}")
        settings = {k: check_setting(k, raw.get(k, "bf16"), f"{source}: quantization_config") for k in KINDS}
        group = raw.get("group_size")
        if not isinstance(group, int) or group <= 0:
            raise OffloadMoeError(f"{source}: quantization_config.group_size {group!r}, expected a positive integer")
        if raw.get("method") not in METHODS:
            raise OffloadMoeError(f"{source}: quantization_config.method {raw.get('method')!r}, "
                                  f"expected one of {', '.join(METHODS)}")
        return cls(settings, group, raw["method"])
