"""Weights of pre-quantized checkpoints in the layouts their publishers store them, computed as stored.

Three forms, each a view of the tensors read from the safetensors file (nothing repacked):
- `FP8BlockWeight`: DeepSeek-V3 / Qwen3-FP8 / GLM FP8. `weight` float8 e4m3 bytes [O, I] (kept as uint8),
  `scale` fp32 [ceil(O/bn), ceil(I/bk)] (the files' `weight_scale_inv`, which multiplies), block (bn, bk).
- `IntPackWeight`: compressed-tensors `pack-quantized` (llm-compressor's W4A16 / W8A16). `packed` int32
  [O, ceil(I·b/32)], values little end first, stored + 2^(b-1); `scale` [O, G] fp32/bf16/fp16; `zero`
  (asymmetric only) int32 [ceil(O/(32/b)), G], packed along the rows the same way; `g_idx` int32 [I]
  (actorder "group" only: each input's group, else k / group).
- `GPTQWeight`: AutoGPTQ / GPTQModel / optimum. `qweight` int32 [I/(32/b), O] (K-major), `qzeros` int32
  [G, O/(32/b)], `scales` fp16 [G, O], `g_idx` int32 [I] (the group of each input; any order with
  desc_act), `zero_offset` 1 for v1 checkpoints, whose zeros are stored minus one; with desc_act an
  `order` made at load (the inputs sorted by group, so the kernel changes scales G times, not I).

Each has the weight-form methods the model and the expert engine use (`linear`, `dequantize_rows`,
`nbytes`, `shape`, `device`, `tensors`, `with_tensors`, `to`). On the CPU `linear` runs our C kernel
(`published_mv.c`: fp32 sums from the stored bytes, fp8 through a 256-entry table, GPTQ accumulated
K-outer) for up to `DENSE_FROM` tokens, and a dense product on rows dequantized in bounded chunks
(`prefill.chunked_linear`) beyond, and on other devices (CUDA: each call dequantizes its chunks there).

Tolerance against float64 math on the float64 dequantization of the same tensors: relative
Frobenius error below `TOLERANCE` (fp32 sums of fp32 products; bf16 activations are exact in fp32).

Shape letters: N tokens, I in features, O out features, G groups, R rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native
from .prefill import chunked_linear

TOLERANCE = 1e-5       # relative Frobenius error vs float64 (fp32 sums; measured ~1e-7, tests/test_published_quant.py)
DENSE_FROM = 64        # tokens from which dequantize-then-multiply (a BLAS product) wins
SCALE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _lib():
    return native.load("published")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., W] -> the unsigned values packed in them, [..., W·32/bits] int32, low bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


class _Form:
    """What the three forms share: the kernel call on the CPU, chunked dequantization elsewhere."""

    entry: str   # the kernel's entry point in published_mv.c
    args: type   # its fixed arguments' struct (native.py, mirroring kernel_args.h)

    def _bind(self, *args: int) -> None:
        """The kernel's fixed arguments, kept for the weight's life (its tensors are never replaced)."""
        lib = _lib() if self.device.type == "cpu" and all(t.is_contiguous() for t in self.tensors().values()) else None
        self._call = getattr(lib, self.entry) if lib is not None else None
        if self._call is not None:
            self._at = self.args(*args)   # in the struct's field order
        self._what = f"{self.entry}: {self.format} {list(self.shape)}"

    @property
    def in_kernel(self) -> bool:
        return self._call is not None

    @property
    def c_call(self) -> tuple[int, int, int] | None:
        """`linear`'s kernel for C callers (`native.entry_point`), or None."""
        return None if self._call is None else native.entry_point(self._call, self._at, DENSE_FROM)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(0, self.shape[0], dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., I] -> [..., O] in x's dtype."""
        O, I = self.shape
        xs = None
        if self._call is not None:
            xs = native.kernel_rows(x if x.dtype in native.DTYPE_CODES else x.float(), I, DENSE_FROM)  # (N, I)
        if xs is None:
            return chunked_linear(x, self)
        y = native.call_rows(self._call, self._at, xs, O, self._what)                                # (N, O)
        return y.to(x.dtype).view(*x.shape[:-1], O)


@dataclass
class FP8BlockWeight(_Form):
    weight: torch.Tensor       # uint8 [O, I]: float8 e4m3fn bytes as stored
    scale: torch.Tensor        # fp32 [ceil(O/bn), ceil(I/bk)]
    block: tuple[int, int]     # (bn, bk), 128 x 128 as published
    entry = "pq_fp8_p"
    args = native.PqFp8Args
    format = "fp8-block"
    bits = 8

    def __post_init__(self) -> None:
        O, I = self.shape
        self._bind(O, I, self.weight.data_ptr(), self.scale.data_ptr(), *self.block)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "scale": self.scale}

    def with_tensors(self, t: dict[str, torch.Tensor]) -> FP8BlockWeight:
        return FP8BlockWeight(t["weight"], t["scale"], self.block)

    def to(self, device, non_blocking: bool = False) -> FP8BlockWeight:
        return self.with_tensors({k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()})

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows r0:r1 as [R, I] in `dtype` (float64 exact: e4m3 values and fp32 scales are)."""
        bn, bk = self.block
        I = self.shape[1]
        work = torch.float64 if dtype == torch.float64 else torch.float32
        w = self.weight[r0:r1].view(torch.float8_e4m3fn).to(work)                       # (R, I)
        rows = torch.arange(r0, r1, device=self.device) // bn
        s = self.scale[rows].to(work).repeat_interleave(bk, dim=1)[:, :I]                # (R, I)
        return (w * s).to(dtype)


@dataclass
class IntPackWeight(_Form):
    packed: torch.Tensor       # int32 [O, ceil(I·bits/32)]
    scale: torch.Tensor        # fp32 / bf16 / fp16 [O, G]
    zero: torch.Tensor | None  # int32 [ceil(O/(32/bits)), G], or None (symmetric)
    group: int
    bits: int                  # 4 or 8
    in_features: int
    g_idx: torch.Tensor | None = None   # int32 [I]: each input's group (actorder "group"), or None: k / group
    entry = "pq_int_p"
    args = native.PqIntArgs

    def __post_init__(self) -> None:
        O, I = self.shape
        self._bind(O, I, self.packed.data_ptr(), self.scale.data_ptr(), SCALE_DTYPES[self.scale.dtype],
                   0 if self.zero is None else self.zero.data_ptr(), self.group, self.bits,
                   0 if self.g_idx is None else self.g_idx.data_ptr(), self.scale.shape[1])

    @property
    def format(self) -> str:
        return f"int{self.bits}-pack"

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.in_features

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"packed": self.packed, "scale": self.scale}
        return {**t, **{k: v for k, v in (("zero", self.zero), ("g_idx", self.g_idx)) if v is not None}}

    def with_tensors(self, t: dict[str, torch.Tensor]) -> IntPackWeight:
        return IntPackWeight(t["packed"], t["scale"], t.get("zero"), self.group, self.bits, self.in_features,
                             t.get("g_idx"))

    def to(self, device, non_blocking: bool = False) -> IntPackWeight:
        return self.with_tensors({k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()})

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        I, b = self.in_features, self.bits
        work = torch.float64 if dtype == torch.float64 else torch.float32
        q = _unpack(self.packed[r0:r1], b)[:, :I].to(work)                              # (R, I)
        groups = (torch.arange(I, device=self.device) // self.group if self.g_idx is None
                  else self.g_idx.long())                                                  # (I,) group of each input
        if self.zero is None:
            z = torch.full((r1 - r0, 1), float(1 << (b - 1)), dtype=work, device=self.device)
        else:
            per = 32 // b
            rows = torch.arange(r0, r1, device=self.device)
            z = ((self.zero[rows // per] >> ((rows % per) * b).to(torch.int32).unsqueeze(1)) & ((1 << b) - 1))
            z = z.to(work)[:, groups]                                                      # (R, I)
        s = self.scale[r0:r1].to(work)[:, groups]                                          # (R, I)
        return ((q - z) * s).to(dtype)


@dataclass
class GPTQWeight(_Form):
    qweight: torch.Tensor      # int32 [I/(32/bits), O]
    qzeros: torch.Tensor       # int32 [G, O/(32/bits)]
    scales: torch.Tensor       # fp16 (or bf16 / fp32) [G, O]
    g_idx: torch.Tensor        # int32 [I]
    bits: int                  # 4 or 8
    zero_offset: int           # 1: v1 checkpoints (zeros stored minus one), 0: v2
    order: torch.Tensor | None = None   # int32 [I]: inputs sorted by group (desc_act), or None: in order
    entry = "pq_gptq_p"
    args = native.PqGptqArgs

    def __post_init__(self) -> None:
        O, I = self.shape
        self._bind(O, I, self.qweight.data_ptr(), self.qzeros.data_ptr(), self.scales.data_ptr(),
                   SCALE_DTYPES[self.scales.dtype], self.g_idx.data_ptr(), self.scales.shape[0], self.bits,
                   self.zero_offset, 0 if self.order is None else self.order.data_ptr())

    @property
    def format(self) -> str:
        return f"gptq-int{self.bits}"

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[1], self.g_idx.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @staticmethod
    def sorted_order(g_idx: torch.Tensor) -> torch.Tensor:
        """The inputs sorted by group (stable), what desc_act's kernel call walks: int32 [I]."""
        return torch.argsort(g_idx, stable=True).to(torch.int32)

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        return t if self.order is None else {**t, "order": self.order}

    def with_tensors(self, t: dict[str, torch.Tensor]) -> GPTQWeight:
        return GPTQWeight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], self.bits, self.zero_offset,
                          t.get("order"))

    def to(self, device, non_blocking: bool = False) -> GPTQWeight:
        return self.with_tensors({k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()})

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Output rows r0:r1 (columns of the stored K-major matrix) as [R, I]."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        b, I = self.bits, self.shape[1]
        q = _unpack(self.qweight[:, r0:r1].transpose(0, 1), b)                         # (R, I) as int32
        z = _unpack(self.qzeros, b)[:, r0:r1] + self.zero_offset                        # (G, R)
        g = self.g_idx.long()
        s = self.scales[:, r0:r1].to(work)                                              # (G, R)
        return ((q.to(work) - z[g].transpose(0, 1).to(work)) * s[g].transpose(0, 1)).to(dtype)


FORMS = (FP8BlockWeight, IntPackWeight, GPTQWeight)

__all__ = ["DENSE_FROM", "FORMS", "FP8BlockWeight", "GPTQWeight", "IntPackWeight", "TOLERANCE"]
