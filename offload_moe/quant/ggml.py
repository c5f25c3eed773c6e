"""A matrix in one of ggml's block layouts, computed from its bytes where they lie.

Why: a GGUF file's quantized tensors are rows of blocks (`gguf.GGML_QUANT_SIZES[type]`: `bs` weights
in `ts` bytes). Repacking them into our groupwise format at load costs a copy of the model in RAM and
a pass over every expert in Python; computing from the blocks in place costs nothing at load. A
`GGMLWeight` is a [O, I] matrix whose `data` is a uint8 [O, I / bs * ts] view (usually into the
file's mapping), with the usual weight-form methods (`linear`, `dequantize_rows`, `nbytes`, `shape`,
`tensors`, `to`, `bind_swiglu`), so the model and the expert engine take it like any other form.

`linear` here is the reference: rows dequantized in bounded chunks with the gguf package, then a dense
product. The C kernels (int8 activations, as llama.cpp's dot products) replace it where they are built.

Shape letters: N tokens, I in features, O out features, R rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

from .prefill import chunked_linear

FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
BLOCK_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4)


def row_bytes(ggml_type: int, in_features: int) -> int:
    """Bytes of one row of `in_features` weights in `ggml_type` (in_features a multiple of its block)."""
    bs, ts = GGML_QUANT_SIZES[T(ggml_type)]
    if in_features % bs:
        raise ValueError(f"{T(ggml_type).name} rows hold multiples of {bs} weights, not {in_features}")
    return in_features // bs * ts


@dataclass
class GGMLWeight:
    """An [O, I] matrix stored as ggml blocks: `data` uint8 [O, row_bytes(type, I)]."""

    data: torch.Tensor          # uint8 [O, I / bs * ts], rows as stored
    ggml_type: int              # a gguf.GGMLQuantizationType in BLOCK_TYPES
    shape: tuple[int, int]      # (O, I)

    def __post_init__(self) -> None:
        self.ggml_type = T(self.ggml_type)
        self.shape = tuple(int(d) for d in self.shape)
        O, I = self.shape
        want = (O, row_bytes(self.ggml_type, I))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want:
            raise ValueError(f"{self.ggml_type.name} weight {list(self.shape)}: data is {self.data.dtype} "
                             f"{list(self.data.shape)}, expected torch.uint8 {list(want)}")

    @property
    def bits(self) -> float:
        """Stored bits per weight (Q4_0: 4.5)."""
        bs, ts = GGML_QUANT_SIZES[self.ggml_type]
        return ts * 8 / bs

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data}

    def to(self, device, non_blocking: bool = False) -> GGMLWeight:
        return self if self.data.device == torch.device(device) else \
            GGMLWeight(self.data.to(device, non_blocking=non_blocking), self.ggml_type, self.shape)

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows r0:r1 as floats: [r1 - r0, I] in `dtype` (the gguf package's own dequantization)."""
        rows = self.data[r0:r1].cpu().numpy()                                   # (R, row bytes)
        w = torch.from_numpy(np.ascontiguousarray(quants.dequantize(rows, self.ggml_type), dtype=np.float32))
        return w.view(r1 - r0, self.shape[1]).to(device=self.data.device, dtype=dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(0, self.shape[0], dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., I] -> [..., O] in x's dtype."""
        return chunked_linear(x, self)

    def bind_swiglu(self, up: GGMLWeight, down: GGMLWeight):
        """`x -> silu(x @ self.T) * (x @ up.T) @ down.T` in one call, or None where no kernel takes the
        three (then the expert computes matrix by matrix through `linear`)."""
        return None


__all__ = ["BLOCK_TYPES", "FLOAT_TYPES", "GGMLWeight", "row_bytes"]
