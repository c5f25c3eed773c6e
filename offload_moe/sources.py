"""Where a model comes from: a checkpoint directory (safetensors) or a GGUF file, behind one call.

Everything that opens a model by path (`load`, `info`, `plan`, `bench`, `tune`, `quantize`) goes
through here, so a `.gguf` path works wherever a directory does."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import Checkpoint
from .config import ModelConfig


def open_checkpoint(path: str | Path, requantize: str | None = None):
    """A `Checkpoint` for a directory, a `GGUFCheckpoint` for a .gguf file (or split set)."""
    from .gguf import GGUFCheckpoint, is_gguf

    if is_gguf(path):
        return GGUFCheckpoint(path, requantize=requantize)
    return Checkpoint(path)


def load_config(path: str | Path) -> ModelConfig:
    """The model's config without reading weights: config.json, or a GGUF file's header."""
    from .gguf import GGUFFile, is_gguf
    from .gguf.checkpoint import header_quantization
    from .gguf.config import config_from_gguf

    if is_gguf(path):
        f = GGUFFile(path)
        return config_from_gguf(f, header_quantization(f))
    return ModelConfig.load(path)
