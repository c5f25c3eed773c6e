"""`load()`: from a checkpoint directory (or the bundled demo) to a ready `Model`.

The order is the architecture's: open the checkpoint lazily → read the dense weights onto the
compute device → give the experts to a provider → build the transformer around both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .api import DEMO_DIR, Model, Progress, resolve_device, resolve_dtype
from .checkpoint import Checkpoint
from .errors import OffloadMoeError
from .experts.resident import ResidentExperts
from .experts.weights import ExpertWeights
from .model import build_transformer
from .text import Tokenizer

DEFAULT_CONTEXT = 4096


def model_name(checkpoint_name: str) -> str:
    """Checkpoint tensor name -> the transformer's parameter name."""
    name = checkpoint_name.removeprefix("model.")
    return name.replace(".mlp.gate.", ".block_sparse_moe.gate.")


def load(path: str | Path | None = None, *, device: str = "auto", dtype=None, profile: str = "auto",
         context_length: int | None = None, progress: Progress | None = None) -> Model:
    """Load a Mixtral-family checkpoint directory (None: the bundled demo model)."""
    if path is None:
        if not (DEMO_DIR / "config.json").exists():
            raise OffloadMoeError(f"{DEMO_DIR}: the bundled demo model is missing from this install")
        path = DEMO_DIR
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, cfg.torch_dtype)
    context = context_length or min(cfg.max_position_embeddings, DEFAULT_CONTEXT)
    if not isinstance(context, int) or context < 2:
        raise OffloadMoeError(f"context_length = {context!r}, expected an integer >= 2")
    report = progress or (lambda what, done, total: None)

    names = list(ckpt.expected_shapes())
    dense = {}
    for i, name in enumerate(names):
        dense[model_name(name)] = ckpt.get(name).to(device=device, dtype=dtype)
        report("dense weights", i + 1, len(names))

    total = cfg.num_layers * cfg.num_experts
    def load_expert(layer: int, e: int) -> ExpertWeights:
        w = {k: v.to(device=device, dtype=dtype) for k, v in ckpt.expert(layer, e).items()}
        report("experts", layer * cfg.num_experts + e + 1, total)
        return ExpertWeights(**w)
    experts = ResidentExperts(load_expert, cfg.num_layers, cfg.num_experts)

    transformer = build_transformer(cfg, dense, experts, device=device, dtype=dtype, max_seq_len=context)
    tokenizer = Tokenizer(ckpt.path) if (ckpt.path / "tokenizer.json").exists() else None
    settings = {"profile": profile, "context_length": context}
    return Model(transformer, experts, tokenizer, ckpt.path, device, dtype, settings)
