"""Groupwise-quantized matrices computed by our C kernel (`qmv.c`) from their stored bytes.

Why: torch's int4 CPU kernel (`cpu_int4.py`) widens every weight to fp32, so a decode step is bound
by instructions, not by the bytes it reads, and 8-bit weights take two of its passes. `qmv.c`
quantizes the activations to int8 (one scale per 64 inputs) and multiplies the codes as bytes
(AVX-512 VNNI or AVX2), as llama.cpp's Q4_0/Q8_0 products do, reading 4- and 8-bit codes in the
checkpoint's own layout (pack.py): an expert in the host tier is computed from its host bytes,
with no second copy. 2- and 3-bit codes are repacked to 4 bits at load.

Where the library is not available (none loads, its variant has no SIMD path, OFFLOAD_MOE_NATIVE=0;
`native.status()` says which), `cpu_matrix` falls back to torch's kernel.

Tolerance against float64 math (`x @ ((code - zero) * scale).T`): relative error (Frobenius)
below `TOLERANCE`: the int8 activations bound it (measured ~0.5-1%, tests/test_cpu_qmv.py), the
same rounding llama.cpp's quantized products apply.

For long prefill chunks (`DEQUANT_MIN_TOKENS[bits]` tokens or more) a dense product on rows dequantized
in chunks wins (`prefill.py`'s bounded scratch), as for the torch kernel.

Shape letters: N tokens, I in features, O out features, G = I / group groups.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from . import native
from .groupwise import QuantizedWeight
from .pack import pack

TOLERANCE = 2.5e-2        # relative error vs float64 math (int8 activations)
DEQUANT_MIN_TOKENS = {4: 224, 8: 144}  # by kernel bits: from here on dequantize-then-multiply wins
                                       # (scripts/prefill_crossover.py; BENCHMARKS.md)
DEQUANT_CHUNK_ROWS = 256  # output rows dequantized at a time
_DTYPES = native.DTYPE_CODES


def qmv_supported(qw: QuantizedWeight) -> bool:
    """Whether the C kernel is available and takes this weight's shape and group size."""
    lib = native.load()
    return lib is not None and lib.qmv_path() > 0 and qw.bits in (2, 3, 4, 8) and \
        bool(lib.qmv_supported(qw.shape[1], qw.group_size, 4 if qw.bits < 8 else 8))


@dataclass
class QmvMatrix:
    """A groupwise-quantized [O, I] weight in the form `qmv.c` reads: 4- or 8-bit codes as pack.py
    lays them out, fp16 scales and zeros [O, G] as stored."""

    codes: torch.Tensor       # uint8 [O, I/2] (4-bit) or [O, I] (8-bit)
    scales: torch.Tensor      # fp16 [O, G]
    zeros: torch.Tensor       # fp16 [O, G]
    group_size: int
    shape: tuple[int, int]    # (O, I)
    bits: int                 # of the source format (2, 3, 4 or 8)

    @property
    def kernel_bits(self) -> int:
        return 8 if self.bits == 8 else 4

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))

    @property
    def dense_from(self) -> int:
        """Token count from which `linear` multiplies dequantized rows instead."""
        return DEQUANT_MIN_TOKENS[self.kernel_bits]

    @property
    def owns_bytes(self) -> bool:
        """Whether the codes are a copy (2/3-bit repacked) rather than the stored bytes."""
        return self.bits not in (4, 8)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Component tensors by name (what a module registers as buffers)."""
        return {"qweight": self.codes, "scales": self.scales, "zeros": self.zeros}

    def __post_init__(self) -> None:
        # what every call passes after the activations: fixed for the matrix's life (its tensors are
        # fields of this object and never replaced)
        O, I = self.shape
        lib = native.load()
        self._call, self._swiglu = lib.qmv_p, lib.qmv_swiglu_p
        self._args = native.QmvArgs(O, I, self.codes.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr(),
                                    self.group_size, self.kernel_bits)   # one argument per call
        self._bound = None   # the last (up, down, bound swiglu) `swiglu` was asked for
        self._what = f"qmv: {self.kernel_bits}-bit {list(self.shape)} weight with group {self.group_size}"

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., I] -> [..., O] in x's dtype (fp32 or bf16 computed as they are; others via fp32)."""
        O, I = self.shape
        xs = x.reshape(-1, I) if x.dtype in _DTYPES else x.reshape(-1, I).float()      # (N, I)
        if not xs.is_contiguous():
            xs = xs.contiguous()
        y = self._chunked_linear(xs) if xs.shape[0] >= self.dense_from else self.linear_packed(xs)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], O)

    @property
    def c_call(self) -> tuple[int, int, int]:
        """`linear_packed` for C callers (`native.entry_point`)."""
        return native.entry_point(self._call, self._args, self.dense_from)

    def linear_packed(self, xs: torch.Tensor) -> torch.Tensor:
        """(N, I) contiguous fp32 or bf16 -> (N, O) in its dtype, from the packed codes at any N."""
        return native.call_rows(self._call, self._args, xs, self.shape[0], self._what)

    def swiglu(self, x: torch.Tensor, up: QmvMatrix, down: QmvMatrix) -> torch.Tensor | None:
        """The SwiGLU expert with this matrix as its gate: silu(x @ self.T) * (x @ up.T) @ down.T in
        one kernel call (x quantized once for gate and up, the hidden activations fp32 until `down`);
        None where it does not apply (other forms of `up`/`down`, a long prefill chunk, another dtype)."""
        bound = self._bound
        if bound is None or bound[0] is not up or bound[1] is not down:
            self._bound = bound = (up, down, self.bind_swiglu(up, down))
        return bound[2](x) if bound[2] is not None else None

    def bind_swiglu(self, up: QmvMatrix, down: QmvMatrix):
        """`swiglu` with `up` and `down` fixed, the matrices checked once: `x -> y or None`."""
        F_, H = self.shape
        if (not isinstance(up, QmvMatrix) or not isinstance(down, QmvMatrix) or up.shape != self.shape
                or down.shape != (H, F_) or up.kernel_bits != self.kernel_bits or up.group_size != self.group_size):
            return None
        limit = min(self.dense_from, down.dense_from)
        g, u, d = self._args, up._args, down._args
        at = native.QmvSwigluArgs(H, F_, g.codes, g.scales, g.zeros, u.codes, u.scales, u.zeros, self.group_size,
                                  self.kernel_bits, d.codes, d.scales, d.zeros, down.group_size, down.kernel_bits)
        call = self._swiglu

        what = f"qmv: expert {[F_, H]} / {list(down.shape)}"

        def swiglu(x: torch.Tensor) -> torch.Tensor | None:
            if x.dtype not in _DTYPES or x.dim() != 2 or x.shape[1] != H or x.shape[0] >= limit or not x.is_contiguous():
                return None
            return native.call_rows(call, at, x, H, what)
        swiglu.args = at   # kept alive with the function (the matrices are kept by their owner)
        return swiglu

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Rows r0:r1 as (code - zero) * scale in fp32, cast to `dtype`: [r1 - r0, I]."""
        O, I = self.shape
        p = self.codes[r0:r1]
        q = p if self.kernel_bits == 8 else torch.stack((p & 15, p >> 4), dim=-1).view(r1 - r0, I)
        q = q.view(r1 - r0, -1, self.group_size).float()                                  # (R, G, group)
        w = (q - self.zeros[r0:r1].float().unsqueeze(-1)) * self.scales[r0:r1].float().unsqueeze(-1)
        return w.view(r1 - r0, I).to(dtype)

    def _chunked_linear(self, xs: torch.Tensor) -> torch.Tensor:
        """(N, I) -> (N, O) through dense products on row chunks of the weight (bounded scratch)."""
        O, _ = self.shape
        out = torch.empty(xs.shape[0], O, dtype=xs.dtype)                                 # (N, O)
        for r0 in range(0, O, DEQUANT_CHUNK_ROWS):
            r1 = min(O, r0 + DEQUANT_CHUNK_ROWS)
            torch.mm(xs, self.dequantize_rows(r0, r1, xs.dtype).t(), out=out[:, r0:r1])
        return out


class QmvGroup:
    """Matrices of one input computed in one kernel call (`qmv_many`: the activations quantized
    once, one parallel loop): `linear(x)` -> [..., sum of their outputs], None for a long prefill
    chunk (then each matrix computes on its own)."""

    def __init__(self, mats: list[QmvMatrix]):
        first = mats[0]
        if len(mats) > 16 or any((m.shape[1], m.group_size, m.kernel_bits) !=
                                 (first.shape[1], first.group_size, first.kernel_bits) for m in mats):
            raise ValueError("a QmvGroup needs up to 16 matrices of one input width, group size and width")
        self.mats, self.out = mats, sum(m.shape[0] for m in mats)
        self.dense_from = min(m.dense_from for m in mats)
        arrays = [(ctypes.c_int64 * len(mats))(*[m.shape[0] for m in mats])]
        for k in ("codes", "scales", "zeros"):                 # pointers, one per matrix
            arrays.append((ctypes.c_void_p * len(mats))(*[getattr(m._args, k) for m in mats]))
        self._call = native.load().qmv_many_p
        self._at = native.QmvManyArgs(first.shape[1], len(mats), *(ctypes.addressof(a) for a in arrays),
                                      first.group_size, first.kernel_bits)
        self._arrays = arrays                                  # kept alive with the matrices
        self._what = f"qmv: a group of {len(mats)} matrices [*, {first.shape[1]}]"

    @property
    def c_call(self) -> tuple[int, int, int]:
        """`linear` for C callers (`native.entry_point`)."""
        return native.entry_point(self._call, self._at, self.dense_from)

    def linear(self, x: torch.Tensor) -> torch.Tensor | None:
        xs = native.kernel_rows(x, self.mats[0].shape[1], self.dense_from)               # (N, I)
        if xs is None:
            return None
        y = native.call_rows(self._call, self._at, xs, self.out, self._what)
        return y.view(*x.shape[:-1], self.out)


def to_qmv(qw: QuantizedWeight) -> QmvMatrix:
    """The kernel's form of a CPU weight: 4- and 8-bit weights share the stored bytes (no copy);
    2- and 3-bit codes are repacked to 4 bits."""
    if not qmv_supported(qw):
        raise ValueError(f"{qw.bits}-bit weight {list(qw.shape)} with group size {qw.group_size}: the qmv kernel "
                         f"needs in % 32 == 0 and a group size of 32, 64 or a multiple of 128 dividing it ({native.status()})")
    codes = qw.packed if qw.bits in (4, 8) else pack(qw.codes(), 4)
    return QmvMatrix(codes.contiguous(), qw.scales.contiguous(), qw.zeros.contiguous(), qw.group_size,
                     tuple(qw.shape), qw.bits)


__all__ = ["DEQUANT_MIN_TOKENS", "TOLERANCE", "QmvGroup", "QmvMatrix", "qmv_supported", "to_qmv"]
