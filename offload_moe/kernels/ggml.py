"""A matrix in one of ggml's block layouts, computed from its bytes where they lie.

Why: a GGUF file's quantized tensors are rows of blocks (`gguf.GGML_QUANT_SIZES[type]`: `bs` weights
in `ts` bytes). Repacking them into our groupwise format at load costs a copy of the model in RAM and
a pass over every expert in Python; computing from the blocks in place costs nothing at load. A
`GGMLWeight` is a [O, I] matrix whose `data` is a uint8 [O, I / bs * ts] view (usually into the
file's mapping), with the usual weight-form methods (`linear`, `dequantize_rows`, `nbytes`, `shape`,
`tensors`, `to`, `bind_swiglu`), so the model and the expert engine take it like any other form.

Products run in our C kernel (`ggml_mv.c`, `native.load("ggml")`) from the blocks as they lie, with
int8 activations as llama.cpp's dot products (one scale per 32 inputs for the legacy types and MXFP4,
per 256 inputs with 16-input sums for the K types), for any number of tokens; F32, F16 and BF16
matrices take the same kernel for a few tokens and a dense product on rows viewed or converted in
bounded chunks for longer inputs. Without the library (none loads, `OFFLOAD_MOE_NATIVE=0`), `linear`
is the reference: rows dequantized in bounded chunks with the gguf package, then a dense product.

Tolerance against float64 math on `gguf.quants.dequantize` of the same bytes: relative Frobenius
error below `TOLERANCE` (the int8 activations; measured in tests/test_cpu_ggml.py). Every output
is one thread's sum in a fixed order, so results do not depend on the thread count, and an expert
computes the same bits from a mapping, a RAM copy or a cache slot.

Shape letters: N tokens, I in features, O out features, R rows.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

from . import native
from .prefill import chunked_linear

FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
BLOCK_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4)
TOLERANCE = 2.5e-2        # relative Frobenius error vs float64 math (int8 activations; measured up to ~1.7%)
FLOAT_KERNEL_TOKENS = 8   # float weights: our kernel up to this many tokens, a dense product beyond
_DTYPES = native.DTYPE_CODES


def kernel():
    """The ggml kernel library built for this machine, or None (`native.status("ggml")` says why)."""
    return native.load("ggml")


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
    ggml_type: int              # a gguf.GGMLQuantizationType in BLOCK_TYPES or FLOAT_TYPES
    shape: tuple[int, int]      # (O, I)

    def __post_init__(self) -> None:
        self.ggml_type = T(self.ggml_type)
        self.shape = tuple(int(d) for d in self.shape)
        O, I = self.shape
        want = (O, row_bytes(self.ggml_type, I))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want:
            raise ValueError(f"{self.ggml_type.name} weight {list(self.shape)}: data is {self.data.dtype} "
                             f"{list(self.data.shape)}, expected torch.uint8 {list(want)}")
        # the kernel's fixed arguments for this matrix's life (`data` is never replaced)
        lib = kernel() if self.data.device.type == "cpu" and self.data.is_contiguous() else None
        self._lib = lib if lib is not None and lib.ggml_supported(int(self.ggml_type), I) else None
        if self._lib is not None:
            self._at = native.GgmlArgs(O, I, self.data.data_ptr(), int(self.ggml_type))   # one argument per call
        self._bound = None   # the last (up, down, bound swiglu) `swiglu` was asked for
        self._what = f"ggml_mv: {self.ggml_type.name} {list(self.shape)}"   # names it in a kernel error

    @property
    def in_kernel(self) -> bool:
        """Whether products run in our C kernel (else the reference: dequantize, then a dense product)."""
        return self._lib is not None

    @property
    def c_call(self) -> tuple[int, int, int] | None:
        """`linear_packed` for C callers (`native.entry_point`), or None where the kernel does not take it."""
        return None if self._lib is None else native.entry_point(self._lib.ggml_mv_p, self._at, self.dense_from)

    @property
    def dense_from(self) -> int:
        """Token count from which `linear` multiplies dequantized rows instead of calling the kernel."""
        return FLOAT_KERNEL_TOKENS if self.ggml_type in FLOAT_TYPES else 1 << 62

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
        """Rows r0:r1 as floats: [r1 - r0, I] in `dtype` (float types viewed as stored where they can be)."""
        O, I = self.shape
        if self.ggml_type in FLOAT_TYPES and self.data.is_contiguous():
            return self.data[r0:r1].view(FLOAT_TYPES[self.ggml_type]).view(r1 - r0, I).to(dtype)
        if self._lib is not None and dtype in _DTYPES:
            return self.rows(torch.arange(r0, r1), dtype)
        rows = self.data[r0:r1].cpu().numpy()                                   # (R, row bytes)
        w = torch.from_numpy(np.ascontiguousarray(quants.dequantize(rows, self.ggml_type), dtype=np.float32))
        return w.view(r1 - r0, I).to(device=self.data.device, dtype=dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(0, self.shape[0], dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `ids` (any shape of int64 row numbers) as floats: [*ids.shape, I] in `dtype`; what a
        quantized token table does per step (only the rows asked for are read)."""
        O, I = self.shape
        flat = ids.reshape(-1).to(torch.int64).contiguous()                      # (R,)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= O):
            raise IndexError(f"row ids must lie in [0, {O}), got {int(flat.min())} .. {int(flat.max())}")
        if self._lib is None or dtype not in _DTYPES:
            rows = self.data[flat.to(self.data.device)].cpu().numpy()
            w = torch.from_numpy(np.ascontiguousarray(quants.dequantize(rows, self.ggml_type), dtype=np.float32))
            return w.view(*ids.shape, I).to(device=self.data.device, dtype=dtype)
        y = torch.empty(flat.numel(), I, dtype=dtype)                            # (R, I)
        rc = self._lib.ggml_rows(self.data.data_ptr(), int(self.ggml_type), I, flat.data_ptr(), flat.numel(),
                                 y.data_ptr(), _DTYPES[dtype])
        if rc != 0:
            raise ValueError(f"ggml_rows: {self.ggml_type.name} [{O}, {I}]")
        return y.view(*ids.shape, I)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., I] -> [..., O] in x's dtype (fp32 and bf16 computed as they are; others via fp32)."""
        O, I = self.shape
        if self._lib is None or x.device.type != "cpu":
            return chunked_linear(x, self)
        xs = x.reshape(-1, I) if x.dtype in _DTYPES else x.reshape(-1, I).float()           # (N, I)
        if xs.shape[0] >= self.dense_from:
            return chunked_linear(x, self)
        if not xs.is_contiguous():
            xs = xs.contiguous()
        y = self.linear_packed(xs)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], O)

    def linear_packed(self, xs: torch.Tensor) -> torch.Tensor:
        """(N, I) contiguous fp32 or bf16 -> (N, O) in its dtype, by the kernel at any N."""
        return native.call_rows(self._lib.ggml_mv_p, self._at, xs, self.shape[0], self._what)

    def swiglu(self, x: torch.Tensor, up: GGMLWeight, down: GGMLWeight) -> torch.Tensor | None:
        """silu(x @ self.T) * (x @ up.T) @ down.T in one kernel call, or None where it does not apply."""
        bound = self._bound
        if bound is None or bound[0] is not up or bound[1] is not down:
            self._bound = bound = (up, down, self.bind_swiglu(up, down))
        return bound[2](x) if bound[2] is not None else None

    def bind_swiglu(self, up: GGMLWeight, down: GGMLWeight):
        """`x -> silu(x @ self.T) * (x @ up.T) @ down.T` in one call (x quantized once for gate and up,
        the hidden activations fp32 until `down`), or None where no kernel takes the three (then the
        expert computes matrix by matrix through `linear`). The function returns None for inputs it
        does not take (another dtype or device, a long input for float weights)."""
        F_, H = self.shape
        if (self._lib is None or not isinstance(up, GGMLWeight) or not isinstance(down, GGMLWeight)
                or up._lib is None or down._lib is None or up.shape != self.shape or down.shape != (H, F_)
                or up.ggml_type != self.ggml_type):
            return None
        limit = min(self.dense_from, down.dense_from)
        at = native.GgmlSwigluArgs(H, F_, self.data.data_ptr(), up.data.data_ptr(), int(self.ggml_type),
                                   down.data.data_ptr(), int(down.ggml_type))
        call = self._lib.ggml_swiglu_p

        what = f"ggml_swiglu: expert {[F_, H]} / {list(down.shape)}"

        def swiglu(x: torch.Tensor) -> torch.Tensor | None:
            if x.dtype not in _DTYPES or x.dim() != 2 or x.shape[1] != H or x.shape[0] >= limit \
                    or not x.is_contiguous() or x.device.type != "cpu":
                return None
            return native.call_rows(call, at, x, H, what)
        swiglu.args = at   # kept alive with the function
        # the same call for C callers (`decode_cpu.ExpertRows`): entry point, its fixed arguments' address, token limit
        swiglu.entry = (ctypes.cast(call, ctypes.c_void_p).value, ctypes.addressof(at), limit)
        return swiglu


def experts_one_token(x: torch.Tensor, fused: list) -> torch.Tensor | None:
    """A decode step's experts in one kernel call: x (1, H) -> (k, H), row j expert j's output, where
    fused[j] is that expert's bound `bind_swiglu` function; None where the call does not apply
    (an expert without one, another dtype or device, experts of different shapes or types). Each row
    equals what `fused[j](x)` returns, bit for bit (the same kernels in the same order); the one call
    saves a parallel region, its barriers and the Python around each expert."""
    lib = kernel()
    if lib is None or x.dtype not in _DTYPES or x.dim() != 2 or x.shape[0] != 1 or x.device.type != "cpu" \
            or not x.is_contiguous() or any(getattr(f, "args", None) is None for f in fused):
        return None
    y = torch.empty(len(fused), x.shape[1], dtype=x.dtype)                              # (k, H)
    code = _DTYPES[x.dtype]
    rc = lib.ggml_experts(x.data_ptr(), code, y.data_ptr(), code, len(fused),
                          (ctypes.c_void_p * len(fused))(*[ctypes.addressof(f.args) for f in fused]), torch.get_num_threads())
    if rc == -1:
        raise MemoryError(f"ggml_experts: no scratch for {len(fused)} experts")
    return y if rc == 0 else None


def stacked_table(gate: list, up: list, down: list, count: int) -> native.ExpertTableArgs | None:
    """A layer's experts as one C table (`layer_step`), from three of them: gate[i], up[i], down[i]
    the matrices of experts 0, 1 and count - 1. Where each matrix kind is one stacked tensor (expert e's
    bytes e strides after expert 0's, as a GGUF file's `ffn_*_exps` lie) of one type in our kernel,
    expert e's arguments are computed in C from the table; otherwise None. Nothing per expert here."""
    mats = (gate, up, down)
    if any(not isinstance(w, GGMLWeight) or not w.in_kernel for ws in mats for w in ws) or count < 2:
        return None
    F_, H = gate[0].shape
    if any(w.shape != (F_, H) for w in gate + up) or any(w.shape != (H, F_) for w in down) \
            or any(w.ggml_type != gate[0].ggml_type for w in gate + up) \
            or any(w.ggml_type != down[0].ggml_type for w in down):
        return None
    strides = []
    for ws in mats:
        first, second, last = (w.data.data_ptr() for w in ws)
        stride = second - first
        if stride < ws[0].nbytes or last != first + (count - 1) * stride:
            return None
        strides.append(stride)
    return native.ExpertTableArgs(ctypes.cast(kernel().ggml_swiglu_p, ctypes.c_void_p).value,
                                  gate[0].data.data_ptr(), up[0].data.data_ptr(), down[0].data.data_ptr(), *strides,
                                  int(gate[0].ggml_type), int(down[0].ggml_type), H, F_, count)


class GGMLGroup:
    """Matrices of one input and one type computed in one kernel call (attention's q, k, v: the
    activations quantized once, one parallel loop): `linear(x)` -> [..., sum of their outputs], or
    None where the kernel does not take it (then each matrix computes on its own)."""

    def __init__(self, mats: list[GGMLWeight]):
        first = mats[0]
        if len(mats) > 16 or any((m.shape[1], m.ggml_type) != (first.shape[1], first.ggml_type) for m in mats):
            raise ValueError("a GGMLGroup needs up to 16 matrices of one input width and one type")
        self.mats, self.out = mats, sum(m.shape[0] for m in mats)
        self._lib = first._lib if all(m._lib is not None for m in mats) else None
        self.dense_from = min(m.dense_from for m in mats)
        self._what = f"ggml_mv_many: {len(mats)} matrices [*, {first.shape[1]}]"
        self._arrays = [(ctypes.c_int64 * len(mats))(*[m.shape[0] for m in mats]),
                        (ctypes.c_void_p * len(mats))(*[m.data.data_ptr() for m in mats])]
        self._at = native.GgmlManyArgs(first.shape[1], len(mats), *(ctypes.addressof(a) for a in self._arrays),
                                       int(first.ggml_type))

    @property
    def c_call(self) -> tuple[int, int, int] | None:
        """`linear` for C callers (`native.entry_point`), or None."""
        return None if self._lib is None else native.entry_point(self._lib.ggml_mv_many_p, self._at, self.dense_from)

    def linear(self, x: torch.Tensor) -> torch.Tensor | None:
        xs = None if self._lib is None else native.kernel_rows(x, self.mats[0].shape[1], self.dense_from)
        if xs is None:
            return None
        y = native.call_rows(self._lib.ggml_mv_many_p, self._at, xs, self.out, self._what)  # (N, sum O)
        return y.view(*x.shape[:-1], self.out)


__all__ = ["BLOCK_TYPES", "FLOAT_TYPES", "TOLERANCE", "GGMLGroup", "GGMLWeight", "experts_one_token", "kernel", "row_bytes",
           "stacked_table"]
