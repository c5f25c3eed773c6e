"""Where a model comes from: a checkpoint directory (safetensors) or a GGUF file, behind one call.

Everything that opens a model by path (`load`, `info`, `plan`, `bench`, `tune`, `quantize`) goes
through here, so a `.gguf` path works wherever a directory does. (Layer: api, beside the loader,
since a tokenizer is text's.)"""

from __future__ import annotations

from pathlib import Path

from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.config import ModelConfig
from ..generation.text import Tokenizer


def open_checkpoint(path: str | Path, requantize: str | None = None):
    """A `Checkpoint` for a directory, a `GGUFCheckpoint` for a .gguf file (or split set)."""
    from ..checkpoints.gguf import GGUFCheckpoint, is_gguf

    if is_gguf(path):
        return GGUFCheckpoint(path, requantize=requantize)
    return Checkpoint(path)


def open_tokenizer(ckpt) -> Tokenizer | None:
    """The tokenizer that comes with a checkpoint: a GGUF header's, or a directory's tokenizer.json."""
    if hasattr(ckpt, "tokenizer_parts"):
        parts = ckpt.tokenizer_parts()
        return None if parts is None else Tokenizer.from_parts(parts.backend, parts.bos_token, parts.eos_token,
                                                               parts.chat_template, parts.source)
    path = Path(ckpt.path)
    return Tokenizer(path) if path.is_dir() and (path / "tokenizer.json").exists() else None


def load_config(path: str | Path) -> ModelConfig:
    """The model's config without reading weights: config.json, or a GGUF file's header."""
    from ..checkpoints.gguf import GGUFFile, is_gguf
    from ..checkpoints.gguf.checkpoint import header_quantization
    from ..checkpoints.gguf.config import config_from_gguf

    if is_gguf(path):
        f = GGUFFile(path)
        return config_from_gguf(f, header_quantization(f))
    return ModelConfig.load(path)
