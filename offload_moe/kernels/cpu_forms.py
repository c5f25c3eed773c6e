"""Which CPU kernel computes a quantized weight, chosen once at load.

Our C kernel (`cpu_qmv.py`: int8 activations, reads the stored 4/8-bit bytes) where it is built
for this machine and takes the shape; else torch's int4 CPU kernel (`cpu_int4.py`: a converted
copy); else the weight itself (its `linear` is the dequantize-then-multiply reference). Every form
has `linear(x)`, `nbytes`, `shape`, `bits`, `tensors()` and `dequantize_rows(r0, r1, dtype)`.
"""

from __future__ import annotations

from . import cpu_int4, cpu_qmv, native
from .cpu_int4 import Int4Planes, int4_supported, to_int4_planes
from .cpu_qmv import QmvMatrix, qmv_supported, to_qmv
from .groupwise import QuantizedWeight

CPU_FORMS = (QmvMatrix, Int4Planes)
TOLERANCE = max(cpu_int4.TOLERANCE, cpu_qmv.TOLERANCE)  # relative error vs float64, whichever kernel runs


def has_cpu_kernel(qw: QuantizedWeight) -> bool:
    """Whether a packed kernel (ours or torch's) computes this groupwise weight on the CPU (other
    forms, e.g. `GGMLWeight`, compute through their own `linear`)."""
    return isinstance(qw, QuantizedWeight) and (qmv_supported(qw) or int4_supported(qw))


def to_cpu_kernel(qw: QuantizedWeight) -> QmvMatrix | Int4Planes:
    """The kernel form of a CPU weight (see `has_cpu_kernel`)."""
    return to_qmv(qw) if qmv_supported(qw) else to_int4_planes(qw)


def cpu_matrix(w):
    """One matrix in its CPU form: a kernel form where one fits, else the weight itself on the CPU
    (float tensors; other packed formats compute through their own `linear`)."""
    if isinstance(w, QuantizedWeight) and has_cpu_kernel(w):
        return to_cpu_kernel(w.to("cpu"))
    return w.to("cpu")


def kernel_name() -> str:
    """What computes quantized CPU matrices on this machine: "qmv (AVX-512 VNNI)", or torch's kernel
    and why ours is not used."""
    lib = native.load()
    if lib is not None and lib.qmv_path() > 0:
        return f"qmv ({native.status()})"
    return f"torch int4 (qmv {native.status()})" if lib is None else "torch int4 (qmv: no SIMD path for this CPU)"


def copies_bytes(qw: QuantizedWeight) -> bool:
    """Whether the CPU form of `qw` is new memory rather than the stored bytes."""
    if qmv_supported(qw):
        return qw.bits not in (4, 8)
    return int4_supported(qw)


def owns_bytes(w) -> bool:
    """Whether a CPU form holds memory of its own (not a view of the weight it came from)."""
    return isinstance(w, Int4Planes) or (isinstance(w, QmvMatrix) and w.owns_bytes)


__all__ = ["CPU_FORMS", "TOLERANCE", "copies_bytes", "cpu_matrix", "has_cpu_kernel", "kernel_name", "owns_bytes", "to_cpu_kernel"]
