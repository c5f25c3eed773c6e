"""CPU kernels for one expert's matrices, in the form the CPU computes them fastest from.

Why: an expert that is not in a device slot can be computed where it sits, in host RAM, instead
of being copied over the link. That only pays if the CPU reads the packed bytes at close to memory
speed, so quantized weights are converted once, at load, into the layout of torch's own CPU
low-bit kernel, and compute never converts anything:

- 2/3/4-bit groupwise -> `Int4Planes` with one plane: the codes (< 16) in torch's int4 CPU layout
  (`aten._convert_weight_to_int4pack_for_cpu`, machine-specific: never persisted), computed by
  `aten._weight_int4pack_mm_for_cpu`. That kernel dequantizes `w = (q - 8) * s + z'` with
  bf16 scales-and-zeros `[in/group, out, 2]`; our format is `w = (code - zero) * scale`, so
  `q = code + c`, `s = scale`, `z' = (8 - c - zero) * scale`, computed in fp32 and rounded to bf16
  once, where `c = 8 - 2**(bits-1)` centres 2/3-bit codes on 8 so `z'` stays small (a large `z'`
  would cancel against `(q - 8) * s` and amplify the bf16 rounding of both).
- 8-bit groupwise -> `Int4Planes` with two planes: `q = 16 * hi + lo` with hi, lo < 16, so
  `w = (hi - 8) * 16 scale + [(lo - 8) * scale + (136 - zero) * scale]`, two int4 products summed
  in fp32. Same bytes as int8 codes; torch's `_weight_int8pack_mm` is per-channel only.
- bf16 / fp16 / fp32 matrices stay as they are and go through F.linear.

The int4 kernel's fast path (AVX2/AVX-512) is bf16-only, so activations are cast to bf16 for it
and the result back to the caller's dtype; it accumulates in fp32. It needs out % 16 == 0 and a
group size of 32/64/128/256; a weight that does not fit keeps its `QuantizedWeight` form (the
`qlinear` reference: dequantize + F.linear, slow). Threads: torch's intra-op pool.

Tolerance against the fp32 reference `qlinear(x.float(), qw)`: relative error (Frobenius) below
1e-2 for every quantized format (bf16 activations, scales and output; measured ~3e-3, the same as
`qlinear` run in bf16). Float matrices are plain F.linear: bitwise what the device path computes
on the CPU.

Shape letters: N tokens, I in features, O out features, G = I / group groups.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..experts.interface import ExpertWeights
from ..quant.groupwise import QuantizedWeight

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_ROWS = 16                   # the kernel packs output rows in blocks of 16
TOLERANCE = 1e-2                 # relative error vs the fp32 reference, every quantized format


def _int4_ops_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


@dataclass
class Int4Planes:
    """A groupwise-quantized [O, I] weight as one or two int4 planes in torch's CPU kernel layout."""

    planes: tuple[torch.Tensor, ...]            # uint8 [O, I/2] each, torch's packed layout (opaque)
    scales_and_zeros: tuple[torch.Tensor, ...]  # bf16 [G, O, 2] each: w = (q - 8) * s + z'
    group_size: int
    shape: tuple[int, int]                      # (O, I)
    bits: int                                   # of the source format (2, 3, 4 or 8)

    @property
    def device(self) -> torch.device:
        return self.planes[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.planes, *self.scales_and_zeros))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., I] -> [..., O] in x's dtype (computed from bf16 activations, fp32 sums)."""
        O, I = self.shape
        xb = x.reshape(-1, I).to(torch.bfloat16).contiguous()                          # (N, I)
        y = None
        for plane, sz in zip(self.planes, self.scales_and_zeros):
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, plane, self.group_size, sz)  # (N, O) bf16
            y = part.float() if y is None else y.add_(part)
        return y.to(x.dtype).view(*x.shape[:-1], O)


def int4_supported(qw: QuantizedWeight) -> bool:
    """Whether torch's int4 CPU kernel can compute this weight (shape and group size)."""
    O, I = qw.shape
    return (_int4_ops_available() and qw.bits in (2, 3, 4, 8) and qw.group_size in INT4_GROUP_SIZES
            and O % INT4_ROWS == 0 and I % qw.group_size == 0)


def to_int4_planes(qw: QuantizedWeight) -> Int4Planes:
    """Convert once (at load): codes into torch's int4 CPU layout, our (scale, zero) into its
    (s, z') per group. Works on CPU tensors; the result is CPU-only."""
    if not int4_supported(qw):
        raise ValueError(f"{qw.bits}-bit weight {list(qw.shape)} with group size {qw.group_size}: the int4 CPU "
                         f"kernel needs out % {INT4_ROWS} == 0 and a group size in {INT4_GROUP_SIZES}")
    codes = qw.codes().to(torch.int32)                                             # (O, I)
    scale = qw.scales.float().t()                                                  # (G, O)
    zero = qw.zeros.float().t()                                                    # (G, O)
    if qw.bits <= 4:
        shift = 8 - (1 << (qw.bits - 1))            # centre 2/3-bit codes on 8: z' stays small, exact in bf16
        parts = [(codes + shift, scale, (8 - shift - zero) * scale)]
    else:
        parts = [(codes >> 4, 16 * scale, torch.zeros_like(scale)),               # high nibbles
                 (codes & 15, scale, (136 - zero) * scale)]                      # low nibbles + offset
    planes, szs = [], []
    for q, s, z in parts:
        planes.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))  # (O, I/2)
        szs.append(torch.stack([s, z], dim=-1).to(torch.bfloat16).contiguous())             # (G, O, 2)
    return Int4Planes(tuple(planes), tuple(szs), qw.group_size, tuple(qw.shape), qw.bits)


def cpu_matrix(w):
    """One matrix in its CPU form: int4 planes where the kernel fits, else the weight itself on the
    CPU (float tensors; other packed formats compute through their own `linear`)."""
    if isinstance(w, QuantizedWeight) and int4_supported(w):
        return to_int4_planes(w.to("cpu"))
    return w.to("cpu")


def cpu_form(weights: ExpertWeights) -> ExpertWeights:
    """An expert as the CPU kernels read it; float matrices (and biases) are shared, not copied,
    when they already live on the CPU."""
    return replace(weights, w1=cpu_matrix(weights.w1), w3=cpu_matrix(weights.w3), w2=cpu_matrix(weights.w2))


def converts(weights: ExpertWeights) -> bool:
    """Whether `cpu_form` makes new tensors (quantized matrices) rather than reusing the bytes."""
    return any(isinstance(getattr(weights, m), QuantizedWeight) and int4_supported(getattr(weights, m))
               for m in ("w1", "w3", "w2"))


def weight_nbytes(weights: ExpertWeights) -> int:
    """Bytes a forward pass reads from the expert's three matrices (packed codes, scales, zeros)."""
    total = 0
    for m in ("w1", "w3", "w2"):
        w = getattr(weights, m)
        total += w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
    return total


def expert_format(weights: ExpertWeights) -> str:
    """The format name of an expert's matrices: "int2".."int8", "bf16", "fp16", "fp32" (another
    packed class by its name: `MXFP4Weight` -> "mxfp4")."""
    w = weights.w1
    if isinstance(w, torch.Tensor):
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(w.dtype, str(w.dtype))
    bits = getattr(w, "bits", None)
    return f"int{bits}" if bits else type(w).__name__.lower().removesuffix("weight")


def reference_linear(x: torch.Tensor, w) -> torch.Tensor:
    """What a CPU kernel must match: F.linear on the fp32 dequantized weight (or the float weight)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    return F.linear(x.float(), w.dequantize(torch.float32))
