"""CPU kernels for one expert's matrices, in the form the CPU computes them fastest from.

Why: an expert that is not in a device slot can be computed where it sits, in host RAM, instead
of being copied over the link. That only pays if the CPU reads the packed bytes at close to memory
speed, so quantized weights get, once at load, the form of a packed CPU kernel (`quant/cpu_forms.py`:
our int8-activation kernel reading the stored bytes, else torch's int4 kernel on a converted copy;
each module says how and to what tolerance), and compute never converts anything. bf16 / fp16 / fp32 matrices stay as they are and go through F.linear: bitwise
what the device path computes on the CPU. A weight the int4 kernel cannot take keeps its
`QuantizedWeight` form (the `qlinear` reference: dequantize + F.linear, slow).

Shape letters: N tokens, I in features, O out features.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..model.expert_interface import ExpertWeights
from ..kernels.cpu_bf16 import PackedBF16, bmv_available, packable
from ..kernels.cpu_forms import CPU_FORMS, TOLERANCE, copies_bytes, cpu_matrix, has_cpu_kernel, owns_bytes
from ..kernels.cpu_int4 import INT4_GROUP_SIZES, INT4_ROWS, Int4Planes, int4_supported, to_int4_planes
from ..kernels.cpu_qmv import QmvMatrix, to_qmv
from ..kernels.groupwise import QuantizedWeight


def cpu_form(weights: ExpertWeights) -> ExpertWeights:
    """An expert as the CPU kernels read it; float matrices (and biases) are shared, not copied,
    when they already live on the CPU."""
    return replace(weights, w1=cpu_matrix(weights.w1), w3=cpu_matrix(weights.w3), w2=cpu_matrix(weights.w2))


def resident_cpu_form(weights: ExpertWeights) -> ExpertWeights:
    """`cpu_form` for an expert that lives on the CPU for good (not a view of a host tier): without
    our bf16 kernel, bf16 matrices are also prepacked for oneDNN (`quant/cpu_bf16.py`; the same
    bytes, products bitwise F.linear's)."""
    w = cpu_form(weights)
    if bmv_available():  # our bf16 kernel reads the stored layout, as it does a slot's
        return w
    return replace(w, **{m: PackedBF16(getattr(w, m)) for m in ("w1", "w3", "w2") if packable(getattr(w, m))})


def converts(weights: ExpertWeights) -> bool:
    """Whether `cpu_form` makes new tensors (some quantized matrices) rather than reusing the bytes."""
    return any(isinstance(getattr(weights, m), QuantizedWeight) and copies_bytes(getattr(weights, m))
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
    if isinstance(w, PackedBF16):
        return "bf16"
    bits = getattr(w, "bits", None)
    return f"int{bits}" if bits else type(w).__name__.lower().removesuffix("weight")


def reference_linear(x: torch.Tensor, w) -> torch.Tensor:
    """What a CPU kernel must match: F.linear on the fp32 dequantized weight (or the float weight)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    return F.linear(x.float(), w.dequantize(torch.float32))


__all__ = ["CPU_FORMS", "INT4_GROUP_SIZES", "INT4_ROWS", "TOLERANCE", "Int4Planes", "QmvMatrix", "converts", "cpu_form", "cpu_matrix",
           "expert_format", "has_cpu_kernel", "int4_supported", "owns_bytes", "reference_linear", "resident_cpu_form",
           "to_int4_planes", "to_qmv", "weight_nbytes"]
