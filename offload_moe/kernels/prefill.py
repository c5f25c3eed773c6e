"""Dequantize-then-multiply with bounded scratch, for long inputs and for formats without a kernel.

Why: above `kernels_triton.MAX_BATCH` rows a dense matmul beats the fused kernels, but
dequantizing a whole Mixtral expert matrix at once costs ~0.7 GB of temporaries (codes, fp32
copies, the result), more than the profiles' reserve. Here a weight is dequantized a chunk of
output rows at a time (at most `CHUNK_ELEMENTS` weights, ~90 MB of temporaries whatever the
matrix) and each chunk's product is written into its columns of the output. Every packed format
(groupwise, NF4, MXFP4) offers `dequantize_rows(r0, r1, dtype)`; `rows_multiple` keeps NF4's
64-weight blocks whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 23  # dequantized weights per chunk (8 Mi: 32 MiB of fp32)


def chunk_rows(in_features: int, limit: int = CHUNK_ELEMENTS, multiple: int = 1) -> int:
    """Rows per chunk: as many as `limit` weights allow, a multiple of `multiple`, at least one multiple."""
    return max(multiple, limit // max(1, in_features) // multiple * multiple)


def chunked_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None, limit: int = CHUNK_ELEMENTS,
                   rows_multiple: int = 1) -> torch.Tensor:
    """x [..., in] @ w.T (+ bias) -> [..., out] for a packed weight `w` with `shape` (out, in) and
    `dequantize_rows(r0, r1, dtype)`, `chunk_rows` weight rows at a time."""
    out_features, in_features = w.shape
    rows = chunk_rows(in_features, limit, rows_multiple)
    if rows >= out_features:
        return F.linear(x, w.dequantize_rows(0, out_features, x.dtype), bias)
    flat = x.reshape(-1, in_features)  # [M, in]
    y = torch.empty(flat.shape[0], out_features, dtype=x.dtype, device=x.device)  # [M, out]
    for r0 in range(0, out_features, rows):
        r1 = min(out_features, r0 + rows)
        y[:, r0:r1] = F.linear(flat, w.dequantize_rows(r0, r1, x.dtype), None if bias is None else bias[r0:r1])
    return y.view(*x.shape[:-1], out_features)
