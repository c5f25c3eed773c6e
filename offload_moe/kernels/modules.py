"""Modules that compute with a quantized weight in place of `nn.Linear` / `nn.Embedding`.

`build_transformer` swaps them in for the dense weights a quantized checkpoint stores packed
(attention projections, embeddings, lm_head), in one pass after construction, as gpt-fast does.
On the CPU a linear weight is put once into a packed CPU kernel's form (`cpu_forms`), so no
call dequantizes the whole matrix; an embedding lookup dequantizes only the rows it looks up."""

from __future__ import annotations

import torch
import torch.nn as nn

from .cpu_forms import has_cpu_kernel, to_cpu_kernel
from .cpu_qmv import QmvGroup, QmvMatrix
from .ggml import GGMLGroup, GGMLWeight
from .groupwise import QuantizedWeight


class QLinear(nn.Module):
    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        self.qw = qw
        if qw.device.type == "cpu" and has_cpu_kernel(qw):
            self.qw = to_cpu_kernel(qw)  # the CPU form replaces the packed bytes (shares them where it can)
        for name, t in self.qw.tensors().items():  # buffers, so .to()/.cuda() and inspection see them
            self.register_buffer(name, t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qw.linear(x)  # a CPU kernel form, or QuantizedWeight's dequantize-then-multiply

    @property
    def c_call(self) -> tuple[int, int, int] | None:
        """The weight's kernel for C callers (`native.entry_point`), or None (no kernel form)."""
        return getattr(self.qw, "c_call", None)


def fused_linear(modules: list[nn.Module]) -> QmvGroup | GGMLGroup | None:
    """One call for several projections of the same input (attention's q, k, v) where all are
    QLinear on one of our CPU kernels with no bias: our format's matrices of one input width, group
    size and width (`QmvGroup`), or a GGUF file's of one input width and block type in the ggml
    kernel (`GGMLGroup`); else None."""
    mats = [getattr(m, "qw", None) for m in modules]
    if not all(isinstance(m, QLinear) for m in modules):
        return None
    try:
        if all(isinstance(w, QmvMatrix) for w in mats):
            return QmvGroup(mats)
        if all(isinstance(w, GGMLWeight) and w.in_kernel for w in mats):
            return GGMLGroup(mats)
    except ValueError:
        return None
    return None


class QEmbedding(nn.Module):
    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.qw, self.dtype = qw, dtype
        for name, t in qw.tensors().items():
            self.register_buffer(name, t, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = getattr(self.qw, "rows", None)
        if rows is not None:
            return rows(ids, self.dtype)  # (B, T) -> (B, T, H)
        return gathered_rows(self.qw, ids, self.dtype)


def gathered_rows(w, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of a weight that only offers `dequantize_rows` (a quantized token table read row by
    row, never whole): (B, T) -> (B, T, H)."""
    flat = ids.reshape(-1).tolist()
    out = torch.empty(len(flat), w.shape[1], dtype=dtype)                        # (B·T, H)
    for i, r in enumerate(flat):
        out[i] = w.dequantize_rows(r, r + 1, dtype)[0]
    return out.view(*ids.shape, w.shape[1]).to(ids.device)
