"""Modules that compute with a quantized weight in place of `nn.Linear` / `nn.Embedding`.

`build_transformer` swaps them in for the dense weights a quantized checkpoint stores packed
(attention projections, embeddings, lm_head), in one pass after construction, as gpt-fast does."""

from __future__ import annotations

import torch
import torch.nn as nn

from .groupwise import QuantizedWeight, qlinear


class QLinear(nn.Module):
    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        self.qw = qw
        for name, t in qw.tensors().items():  # buffers, so .to()/.cuda() and inspection see them
            self.register_buffer(name, t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.qw)


class QEmbedding(nn.Module):
    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.qw, self.dtype = qw, dtype
        for name, t in qw.tensors().items():
            self.register_buffer(name, t, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qw.rows(ids, self.dtype)  # (B, T) -> (B, T, H)
