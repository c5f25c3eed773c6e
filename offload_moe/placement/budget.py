"""Sizes checked before memory is taken: the context length against the model's limit, and the KV
cache against the memory of the device it will live on. Each check is arithmetic on
`ModelConfig`; it runs before any weight is read, so `--context-length 100000000` is one line
rather than minutes of swapping and an allocator abort.
"""

from __future__ import annotations

import torch

from ..base import runtime
from ..checkpoints.config import ModelConfig
from ..base.errors import OffloadMoeError


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_context(cfg: ModelConfig, context: int, force: bool) -> str | None:
    """An error past the model's max_position_embeddings, or with `force` a warning to show."""
    limit = cfg.max_position_embeddings
    if context <= limit:
        return None
    message = (f"context_length = {context} exceeds the model's max_position_embeddings = {limit} "
               "(config.json); positions past it were never trained")
    if not force:
        raise OffloadMoeError(message + "; pass --force-context (force_context=True) to use it anyway")
    return message + "; using it anyway (--force-context)"


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (0: unknown)."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return 0
    return runtime.available_ram()


def check_kv_cache(cfg: ModelConfig, context: int, device: torch.device, dtype: torch.dtype) -> None:
    size = torch.finfo(dtype).bits // 8
    need = context * cfg.kv_cache_bytes_per_token(size) + cfg.recurrent_state_bytes(size)
    free = free_memory(device)
    if free and need > free:
        where = "free VRAM" if device.type == "cuda" else "available RAM"
        fits = free // max(1, cfg.kv_cache_bytes_per_token(size))
        raise OffloadMoeError(f"context_length = {context} needs a KV cache of {_gb(need)}, more than the "
                              f"{_gb(free)} of {where}; at most about {fits} tokens fit")


def check_host_ram(what: str, need: int) -> None:
    free = runtime.available_ram()
    if free and need > free:
        raise OffloadMoeError(f"{what} needs {_gb(need)} of RAM but only {_gb(free)} is available; "
                              "lower --ram-budget (the rest goes to disk) or use --offload disk")
