"""Synthetic checkpoints: the real layer shapes of known models with random weights.

A `SyntheticCheckpoint` answers the same reads as `Checkpoint` (config, dense tensors, one expert
at a time) but makes the tensors up, deterministically from a seed and the tensor's name, so a
full-size Mixtral-8x7B can be benchmarked layer by layer straight into the expert tiers without a
90 GB file. `layers` and `scale` shrink it for CPU smoke tests while keeping its proportions.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from .checkpoint import dense_shapes
from .config import ModelConfig
from .errors import OffloadMoeError

# Published config.json values (the fields our ModelConfig reads).
KNOWN_MODELS = {
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
                         max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
                         torch_dtype="bfloat16"),
}


def synthetic_config(name: str, *, layers: int | None = None, scale: float = 1.0) -> ModelConfig:
    if name not in KNOWN_MODELS:
        raise OffloadMoeError(f"synthetic model {name!r} is not known (known: {', '.join(sorted(KNOWN_MODELS))})")
    raw = dict(KNOWN_MODELS[name])
    if layers is not None:
        if not 1 <= layers <= raw["num_hidden_layers"]:
            raise OffloadMoeError(f"layers = {layers}, expected 1..{raw['num_hidden_layers']} for {name}")
        raw["num_hidden_layers"] = layers
    if not 0 < scale <= 1:
        raise OffloadMoeError(f"scale = {scale}, expected 0 < scale <= 1")
    if scale < 1:
        heads = raw["num_attention_heads"]
        head_dim = raw["hidden_size"] // heads
        raw["head_dim"] = max(8, round(head_dim * scale / 8) * 8)
        raw["hidden_size"] = heads * raw["head_dim"]
        raw["intermediate_size"] = max(64, round(raw["intermediate_size"] * scale / 64) * 64)
        raw["vocab_size"] = max(256, round(raw["vocab_size"] * scale))
    return ModelConfig.from_dict(raw, source=f"synthetic:{name}")


class SyntheticCheckpoint:
    """Random weights with a known model's shapes; same read interface as `Checkpoint`."""

    layout = "per_expert"

    def __init__(self, name: str, *, layers: int | None = None, scale: float = 1.0, seed: int = 0):
        self.config = synthetic_config(name, layers=layers, scale=scale)
        self.path = Path(f"synthetic:{name}")
        self.seed = seed
        self.dtype = torch.bfloat16

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return dense_shapes(self.config)

    def _random(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=self.dtype)  # norm weights
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(self.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._random(name, self.expected_shapes()[name])

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        H, I = self.config.hidden_size, self.config.intermediate_size
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        return {"w1": self._random(p + "w1", (I, H)), "w3": self._random(p + "w3", (I, H)),
                "w2": self._random(p + "w2", (H, I))}
