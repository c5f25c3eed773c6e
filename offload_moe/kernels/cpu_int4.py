"""Groupwise-quantized matrices in the layout of torch's int4 CPU kernel, and their products.

Why: on the CPU a decode step is a chain of matrix-vector products, each bound by the bytes it
reads, so a packed weight must be multiplied from its packed form (never dequantized whole). The
fastest packed kernel torch ships for x86 and ARM is `aten._weight_int4pack_mm_for_cpu` (measured
against the others in BENCHMARKS.md, "CPU kernels"), so quantized weights are converted once, at
load, into its layout:

- 2/3/4-bit groupwise -> `Int4Planes` with one plane: the codes (< 16) in torch's int4 CPU layout
  (`aten._convert_weight_to_int4pack_for_cpu`, machine-specific: never persisted). The kernel
  dequantizes `w = (q - 8) * s + z'` with bf16 scales-and-zeros `[in/group, out, 2]`; our format
  is `w = (code - zero) * scale`, so `q = code + c`, `s = scale`, `z' = (8 - c - zero) * scale`,
  computed in fp32 and rounded to bf16 once, where `c = 8 - 2**(bits-1)` centres 2/3-bit codes on 8
  so `z'` stays small (a large `z'` would cancel against `(q - 8) * s` and amplify the rounding).
- 8-bit groupwise -> two planes: `q = code + c = 16 * hi + lo` with hi, lo < 16, so
  `w = (hi - 8) * 16 scale + [(lo - 8) * scale + (136 - c - zero) * scale]`, two int4 products
  summed in fp32, where `c = 128 - 2**(w-1)` for codes below `2**w` centres narrow codes (GGUF's
  5-bit types are stored as 8-bit codes < 32) on 128, for the same reason as above. Same bytes as int8 codes; torch's `_weight_int8pack_mm` is per-channel only.

The kernel's fast path (AVX2/AVX-512) is bf16-only, so activations are cast to bf16 for it and the
result back to the caller's dtype; it accumulates in fp32. It needs out % 16 == 0 and a group size
of 32/64/128/256. Its cost grows with the number of tokens about as fast as a dense product's
does while reading 4x fewer bytes, so at batch 1 it wins by the bytes and for long prefill chunks
a dense bf16 product on a dequantized copy wins: at `DEQUANT_MIN_TOKENS` tokens or more the
weight is dequantized in chunks of `DEQUANT_CHUNK_ROWS` output rows (bounded scratch), each
multiplied by the dense kernel. Dequantizing reads the layout back, which this module learns
once by converting a probe (`_block_rows`); where the layout is not the blocked one it knows,
the packed kernel is used at every batch size.

Tolerance against float64 math (`x @ ((code - zero) * scale).T` in float64): relative error
(Frobenius) below `TOLERANCE` for every width and group size: bf16 activations, scales and
output bound it (measured ~3e-3; tests/test_cpu_int4.py).

Shape letters: N tokens, I in features, O out features, G = I / group groups, B rows per block
of the kernel's layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .groupwise import QuantizedWeight

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_ROWS = 16                   # the kernel packs output rows in blocks of 16
TOLERANCE = 1e-2                 # relative error vs float64 math, every quantized format
DEQUANT_MIN_TOKENS = 128         # from here on dequantize-then-multiply wins (measured; BENCHMARKS.md)
DEQUANT_CHUNK_ROWS = 256         # output rows dequantized at a time: scratch ~ 256 * I * 6 bytes


def int4_ops_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _pack(q: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


@functools.cache
def _block_rows() -> tuple[int, torch.Tensor] | None:
    """(B, rows): the kernel's layout as this machine's torch builds it, learned from a probe.

    Known layout: the packed [O, I/2] bytes are [O/B, I, B/2], byte j of (block, i) holding two
    rows' codes for input i, low nibble then high; `rows` [B] says which row of the block each of
    the B nibbles holds. None when the probe shows another layout (then nothing is dequantized)."""
    if not int4_ops_available():
        return None
    O, I = 128, 32
    row = torch.arange(O, dtype=torch.int32)[:, None].expand(O, I)
    slots = []
    for probe in (row % 16, row // 16):
        p = _pack(probe)                                                    # (O, I/2) bytes
        slots.append(torch.stack([p & 15, p >> 4], dim=-1).reshape(-1).long())  # nibbles in memory order
    held = slots[0] + 16 * slots[1]                                          # (O*I,) row of each nibble
    for B in (64, 32, 16):
        r = held.view(O // B, I, B)
        rows = r[0, 0]
        offsets = (torch.arange(O // B) * B)[:, None, None]
        if torch.equal(torch.sort(rows).values, torch.arange(B)) and bool((r == rows + offsets).all()):
            return B, rows
    return None


# the usual layout: byte j of a block holds row j (low nibble) and row j + B/2 (high nibble)
_HALVES = {B: torch.stack((torch.arange(B // 2), torch.arange(B // 2, B)), dim=-1).flatten() for B in (16, 32, 64)}


@functools.cache
def _slot_of_row(B: int) -> torch.Tensor:
    """Index into (low nibbles, then high nibbles) of the slot holding each row of a block."""
    _, rows = _block_rows()
    order = torch.cat((rows[0::2], rows[1::2]))             # row held by each position of the cat
    return order.argsort()


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

    def tensors(self) -> dict[str, torch.Tensor]:
        """Component tensors by name (what a module registers as buffers)."""
        named = {f"plane{i}": t for i, t in enumerate(self.planes)}
        named.update({f"scales_and_zeros{i}": t for i, t in enumerate(self.scales_and_zeros)})
        return named

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., I] -> [..., O] in x's dtype (computed from bf16 activations, fp32 sums)."""
        O, I = self.shape
        xb = x.reshape(-1, I).to(torch.bfloat16).contiguous()                          # (N, I)
        if xb.shape[0] >= DEQUANT_MIN_TOKENS and self.dequantizable:
            return self._chunked_linear(xb).to(x.dtype).view(*x.shape[:-1], O)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        if len(self.planes) == 1:
            y = mm(xb, self.planes[0], self.group_size, self.scales_and_zeros[0])       # (N, O) bf16
        else:
            y = mm(xb, self.planes[0], self.group_size, self.scales_and_zeros[0]).float()
            for plane, sz in zip(self.planes[1:], self.scales_and_zeros[1:]):
                y.add_(mm(xb, plane, self.group_size, sz))                              # fp32 sum of planes
        return y.to(x.dtype).view(*x.shape[:-1], O)

    @property
    def dequantizable(self) -> bool:
        layout = _block_rows()
        return layout is not None and self.shape[0] % layout[0] == 0

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Rows r0:r1 of the weight as the kernel computes them, [r1 - r0, I] in `dtype`; r0 and r1
        multiples of the layout's block rows (see `dequantizable`)."""
        B, rows = _block_rows()
        O, I = self.shape
        b0, b1, R = r0 // B, r1 // B, r1 - r0
        w = None
        for plane, sz in zip(self.planes, self.scales_and_zeros):
            p = plane.view(O // B, I, B // 2)[b0:b1]                                   # (nb, I, B/2) bytes
            q = torch.cat((p & 15, p >> 4), dim=-1)                                   # (nb, I, B): low nibbles, then high
            if not torch.equal(rows, _HALVES[B]):
                q = q.index_select(-1, _slot_of_row(B))                               # rows in order
            q = q.transpose(1, 2).reshape(R, -1, self.group_size)                      # (R, G, group) codes
            s = sz[:, r0:r1, 0].t().float().unsqueeze(-1)                              # (R, G, 1)
            z = sz[:, r0:r1, 1].t().float().unsqueeze(-1) - 8 * s                      # (q - 8) s + z' = q s + z
            part = torch.addcmul(z, q.float(), s)                                      # (R, G, group) fp32
            w = part if w is None else w.add_(part)
        return w.reshape(R, I).to(dtype)

    def _chunked_linear(self, xb: torch.Tensor) -> torch.Tensor:
        """(N, I) bf16 -> (N, O) bf16 through dense products on row chunks of the weight."""
        O, _ = self.shape
        out = torch.empty(xb.shape[0], O, dtype=torch.bfloat16)                        # (N, O)
        for r0 in range(0, O, DEQUANT_CHUNK_ROWS):
            r1 = min(O, r0 + DEQUANT_CHUNK_ROWS)
            torch.mm(xb, self.dequantize_rows(r0, r1).t(), out=out[:, r0:r1])
        return out


def int4_supported(qw: QuantizedWeight) -> bool:
    """Whether torch's int4 CPU kernel can compute this weight (shape and group size)."""
    O, I = qw.shape
    return (int4_ops_available() and qw.bits in (2, 3, 4, 8) and qw.group_size in INT4_GROUP_SIZES
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
        # centre narrow 8-bit codes (GGUF's 5-bit Q5_0/Q5_1/Q5_K, codes < 32) on 128 as well, so the
        # high plane's (hi - 8) * 16 s and the low plane's z' stay small instead of cancelling
        # (-128 s against ~+120 s, each rounded to bf16: an error of ~s/4 on every weight)
        width = max(int(codes.max()).bit_length(), 1) if codes.numel() else 8
        shift = 128 - (1 << (width - 1))
        codes = codes + shift
        parts = [(codes >> 4, 16 * scale, torch.zeros_like(scale)),               # high nibbles
                 (codes & 15, scale, (136 - shift - zero) * scale)]              # low nibbles + offset
    planes, szs = [], []
    for q, s, z in parts:
        planes.append(_pack(q))                                                    # (O, I/2)
        szs.append(torch.stack([s, z], dim=-1).to(torch.bfloat16).contiguous())   # (G, O, 2)
    return Int4Planes(tuple(planes), tuple(szs), qw.group_size, tuple(qw.shape), qw.bits)

