"""Groupwise affine quantization of [out, in] linear weights along the input dimension.

Why: an expert's bytes are what offloading moves; 4 bits cut them to ~28% of bf16 and 2 bits to
~16%, so more experts stay resident and each miss costs less PCIe time. Each run of `group_size`
consecutive input weights of one output row gets its own fp16 scale and zero point:

    code = clamp(round(w / scale + zero), 0, 2**bits - 1)      w ~ (code - zero) * scale

Codes are bit-packed along the input dimension (see pack.py). Scale and zero are rounded to fp16
*before* the codes are chosen, so the codes are optimal for the values that are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import hqq
from .pack import check_bits, pack, packed_cols, unpack

METHODS = ("rtn", "hqq")
MIN_SCALE = 2.0**-24  # smallest positive fp16: a scale never rounds to zero
MAX_ZERO_RATIO = 1024.0  # scale >= max|w| / 1024 keeps |zero| <= 1024, exact enough in fp16
CHUNK_ELEMENTS = 1 << 22  # rows per quantization chunk * in_features: bounds the fp32 temporaries


def nbytes_for(shape: tuple[int, int], bits: int, group_size: int = 64) -> int:
    """Bytes of a quantized [out, in] weight: packed codes + fp16 scales + fp16 zeros."""
    out_features, in_features = shape
    check_bits(bits)
    check_group_size(in_features, group_size)
    groups = out_features * (in_features // group_size)
    return out_features * packed_cols(in_features, bits) + 2 * 2 * groups


def check_group_size(in_features: int, group_size: int) -> None:
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group size {group_size!r} does not divide the input dimension {in_features}: "
            f"expected a positive divisor of {in_features}"
        )


@dataclass
class QuantizedWeight:
    """A packed groupwise-quantized [out, in] weight; what an offloaded expert carries around."""

    packed: torch.Tensor  # uint8 [out, ceil(in * bits / 8)]
    scales: torch.Tensor  # fp16 [out, in // group_size]
    zeros: torch.Tensor  # fp16 [out, in // group_size]
    bits: int
    group_size: int
    shape: tuple[int, int]  # (out, in) of the original weight

    def __post_init__(self) -> None:
        check_bits(self.bits)
        out_features, in_features = self.shape = tuple(int(d) for d in self.shape)
        check_group_size(in_features, self.group_size)
        want = {
            "qweight": ((out_features, packed_cols(in_features, self.bits)), torch.uint8, self.packed),
            "scales": ((out_features, in_features // self.group_size), torch.float16, self.scales),
            "zeros": ((out_features, in_features // self.group_size), torch.float16, self.zeros),
        }
        for name, (shape, dtype, t) in want.items():
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"{name} is {t.dtype} {list(t.shape)}: expected {dtype} {list(shape)} for a "
                    f"{self.bits}-bit {list(self.shape)} weight with group size {self.group_size}"
                )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def codes(self) -> torch.Tensor:
        """The unpacked uint8 codes [out, in]."""
        return unpack(self.packed, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(code - zero) * scale in fp32, cast to `dtype`: [out, in]."""
        out_features, in_features = self.shape
        q = self.codes().view(out_features, -1, self.group_size).float()  # [out, G, group]
        w = (q - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)  # [out, G, group]
        return w.view(out_features, in_features).to(dtype)

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows r0:r1 dequantized: [r1 - r0, in] (prefill.chunked_linear's unit of work)."""
        part = QuantizedWeight(self.packed[r0:r1], self.scales[r0:r1], self.zeros[r0:r1], self.bits,
                               self.group_size, (r1 - r0, self.shape[1]))
        return part.dequantize(dtype)

    def to(self, device, non_blocking: bool = False) -> "QuantizedWeight":
        packed, scales, zeros = (t.to(device, non_blocking=non_blocking)
                                 for t in (self.packed, self.scales, self.zeros))
        return QuantizedWeight(packed, scales, zeros, self.bits, self.group_size, self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Component tensors by suffix: what an expert's flat slot buffer stores."""
        return {"qweight": self.packed, "scales": self.scales, "zeros": self.zeros}

    def with_tensors(self, t: dict[str, torch.Tensor]) -> "QuantizedWeight":
        """The same quantized weight over other storage (e.g. views into a device slot)."""
        return QuantizedWeight(t["qweight"], t["scales"], t["zeros"], self.bits, self.group_size, self.shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self)

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows `index` (an embedding lookup): [*index.shape, in]."""
        flat = index.reshape(-1)
        part = QuantizedWeight(self.packed[flat], self.scales[flat], self.zeros[flat], self.bits,
                               self.group_size, (flat.numel(), self.shape[1]))
        return part.dequantize(dtype).view(*index.shape, self.shape[1])

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.qweight": self.packed, f"{prefix}.scales": self.scales, f"{prefix}.zeros": self.zeros}

    @classmethod
    def from_state_dict(cls, tensors, prefix: str, bits: int, group_size: int,
                        shape: tuple[int, int]) -> "QuantizedWeight":
        parts = []
        for suffix in ("qweight", "scales", "zeros"):
            key = f"{prefix}.{suffix}"
            if key not in tensors:
                raise ValueError(f"missing tensor {key!r}: expected qweight, scales and zeros under {prefix!r}")
            parts.append(tensors[key])
        return cls(*parts, bits=bits, group_size=group_size, shape=tuple(shape))


def rtn_params(wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale (fp16-rounded) and zero for float32 groups [M, group] -> ([M, 1], [M, 1])."""
    wmin = wg.amin(dim=-1, keepdim=True)  # [M, 1]
    wmax = wg.amax(dim=-1, keepdim=True)
    floor = torch.maximum(wmax.abs(), wmin.abs()) / MAX_ZERO_RATIO
    scale = torch.maximum((wmax - wmin) / qmax, floor).clamp_min(MIN_SCALE)
    scale = scale.to(torch.float16).float().clamp_min(MIN_SCALE)
    return scale, -wmin / scale


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int = 64,
    method: str = "rtn",
    *,
    hqq_iters: int = 20,
    refit_scale: bool = False,
) -> QuantizedWeight:
    """Quantize a float [out, in] weight groupwise along `in`.

    method "rtn": min-max round-to-nearest; "hqq": RTN then HQQ zero-point optimisation
    (`refit_scale=True` adds a least-squares scale/zero refit per group, see hqq.py).
    Deterministic; works on the weight's own device in fp32 chunks of rows.
    """
    check_bits(bits)
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}: expected one of {', '.join(METHODS)}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize expects a 2-D float [out, in] weight, got {w.dim()}-D {w.dtype}")
    out_features, in_features = w.shape
    if w.numel() == 0:
        raise ValueError(f"weight {list(w.shape)} is empty: expected a non-empty [out, in] matrix")
    check_group_size(in_features, group_size)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight {list(w.shape)} has NaN or infinite values: expected finite weights")
    qmax = (1 << bits) - 1
    groups = in_features // group_size
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, in_features))
    packed, scales, zeros = [], [], []
    for r0 in range(0, out_features, rows_per_chunk):
        wg = w[r0:r0 + rows_per_chunk].float().reshape(-1, group_size)  # [rows*G, group]
        scale, zero = rtn_params(wg, qmax)  # [rows*G, 1] each
        if method == "hqq":
            zero = hqq.optimize_zero(wg, scale, zero, qmax, iters=hqq_iters)
        zero = zero.clamp(-hqq.FP16_MAX, hqq.FP16_MAX).to(torch.float16).float()
        if method == "hqq" and refit_scale:
            scale, zero = hqq.refit_scale(wg, scale, zero, qmax)
        codes = torch.round(wg / scale + zero).clamp_(0, qmax).to(torch.uint8)  # [rows*G, group]
        rows = codes.shape[0] // groups
        packed.append(pack(codes.view(rows, in_features), bits))  # [rows, packed_cols]
        scales.append(scale.view(rows, groups).to(torch.float16))
        zeros.append(zero.view(rows, groups).to(torch.float16))
    return QuantizedWeight(torch.cat(packed), torch.cat(scales), torch.cat(zeros), bits, group_size,
                           (out_features, in_features))


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
            use_triton: bool | None = None) -> torch.Tensor:
    """y = x @ dequantize(qw).T (+ bias) for x [..., in] -> [..., out].

    Small batches on CUDA go to the fused Triton dequantize-matvec kernel when triton is
    importable (`use_triton=None` decides; False forces the reference path); everything else
    dequantizes to x's dtype and calls F.linear, the portable reference.
    """
    if x.shape[-1] != qw.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features: expected {qw.shape[1]} for a {list(qw.shape)} weight")
    if use_triton is not False and x.is_cuda and qw.packed.is_cuda:
        from . import kernels_triton

        small = x.numel() // x.shape[-1] <= kernels_triton.MAX_BATCH
        if kernels_triton.supports(x, qw.bits) and (use_triton or small):
            y = kernels_triton.dequant_matmul(x.reshape(-1, x.shape[-1]), qw)  # [B, out]
            y = y.view(*x.shape[:-1], qw.shape[0])
            return y + bias if bias is not None else y
    if x.is_cuda:  # long inputs: dequantize a bounded chunk of rows at a time
        from .prefill import chunked_linear

        return chunked_linear(x, qw, bias)
    return F.linear(x, qw.dequantize(x.dtype), bias)
