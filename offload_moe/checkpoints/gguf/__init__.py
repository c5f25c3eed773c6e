"""GGUF in: llama.cpp / ollama / LM Studio model files read as checkpoints (see checkpoint.py).

    from offload_moe import load
    model = load("Mixtral-8x7B-Instruct-v0.1.Q4_K_M.gguf")   # or the first file of a split set

Metadata becomes our `ModelConfig` (config.py), tensors are memory-mapped and their blocks mapped
onto our packed formats (blocks.py), the tokenizer and chat template come from the header
(tokenizer.py)."""

from .checkpoint import GGUFCheckpoint
from .reader import GGUFFile, is_gguf
from .tokenizer import TokenizerParts, tokenizer_parts

__all__ = ["GGUFCheckpoint", "GGUFFile", "TokenizerParts", "is_gguf", "tokenizer_parts"]
