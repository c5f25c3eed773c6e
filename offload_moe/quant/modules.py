"""Modules that compute with a quantized weight in place of `nn.Linear` / `nn.Embedding`.

`build_transformer` swaps them in for the dense weights a quantized checkpoint stores packed
(attention projections, embeddings, lm_head), in one pass after construction, as gpt-fast does.
On the CPU a linear weight is converted once into the packed CPU kernel's form (`cpu_int4`), so no
call dequantizes the whole matrix; an embedding lookup dequantizes only the rows it looks up."""

from __future__ import annotations

import torch
import torch.nn as nn

from .cpu_int4 import Int4Planes, int4_supported, to_int4_planes
from .groupwise import QuantizedWeight, qlinear


class QLinear(nn.Module):
    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        self.qw = qw
        if qw.device.type == "cpu" and int4_supported(qw):
            self.qw = to_int4_planes(qw)  # the CPU form replaces the packed bytes (same size)
            tensors = {f"plane{i}": t for i, t in enumerate(self.qw.planes)}
            tensors.update({f"scales_and_zeros{i}": t for i, t in enumerate(self.qw.scales_and_zeros)})
        else:
            tensors = qw.tensors()
        for name, t in tensors.items():  # buffers, so .to()/.cuda() and inspection see them
            self.register_buffer(name, t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.qw, Int4Planes):
            return self.qw.linear(x)
        return qlinear(x, self.qw)


class QEmbedding(nn.Module):
    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.qw, self.dtype = qw, dtype
        for name, t in qw.tensors().items():
            self.register_buffer(name, t, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qw.rows(ids, self.dtype)  # (B, T) -> (B, T, H)
