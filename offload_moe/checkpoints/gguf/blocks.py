"""GGUF / ggml block formats mapped onto our packed weights, without requantizing where exact.

Each ggml quantized row is a run of blocks of `bs` weights stored in `ts` bytes (`gguf.GGML_QUANT_SIZES`).
Every type below is, per group of 16 or 32 weights, an affine map of an unsigned code `q`:

    w = a * q + b          ->  ours: code = q, scale = a, zero = -b / a   (w = (code - zero) * scale)

so a row becomes a `QuantizedWeight` (codes bit-packed, fp16 scale and zero per group):

| ggml  | block                                  | a, b per group                 | ours              |
|-------|----------------------------------------|--------------------------------|-------------------|
| Q8_0  | d, int8 qs[32]                          | d, -128 d (q = qs + 128)       | int8, group 32    |
| Q4_0  | d, qs[16] (nibbles j, j+16)             | d, -8 d                        | int4, group 32    |
| Q4_1  | d, m, qs[16]                            | d, m                           | int4, group 32    |
| Q5_0  | d, qh[4], qs[16]                        | d, -16 d                       | int8, group 32    |
| Q5_1  | d, m, qh[4], qs[16]                     | d, m                           | int8, group 32    |
| Q2_K  | 16 x (4-bit scale, 4-bit min), d, dmin  | d sc, -dmin m (16 weights)     | int2, group 16    |
| Q3_K  | hmask, qs, 16 signed 6-bit scales, d    | d (sc - 32), -4 a              | int3, group 16    |
| Q4_K  | d, dmin, 8 x 6-bit (sc, m), qs[128]     | d sc, -dmin m (32 weights)     | int4, group 32    |
| Q5_K  | as Q4_K + qh[32]                        | d sc, -dmin m                  | int8, group 32    |
| Q6_K  | ql, qh, 16 int8 scales, d               | d sc, -32 a (16 weights)       | int8, group 16    |

Q8_0, Q4_0 and Q5_0 are bit-exact (one fp16 scale, an integer zero). Q3_K and Q6_K keep their
integer zero and round only `a` (an fp16 times a small integer) to fp16; the types with a min
(Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) also round the zero `-b / a` to fp16: the "fp16 rounding of the
scales". A group with a = 0 stores its constant b as codes 0, zero -1, scale b.
MXFP4 (gpt-oss) is repacked into our `MXFP4Weight` (same E2M1 codes and E8M0 exponents, another
nibble order). F32 / F16 / BF16 are floats. Every other type (IQ*, TQ*, ...) has no exact form
here: `requantize` dequantizes it with the gguf package and quantizes it again (RTN, group 32),
or the caller refuses it.

Shape letters: R rows, C weights per row, N blocks (R * C / bs), K weights per block.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ...kernels.groupwise import QuantizedWeight
from ...kernels.groupwise import quantize as quantize_weight
from ...kernels.mxfp4 import MXFP4Weight
from ...kernels.pack import pack

FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
# ggml type -> (our bits, group size)
PACKED = {T.Q8_0: (8, 32), T.Q4_0: (4, 32), T.Q4_1: (4, 32), T.Q5_0: (8, 32), T.Q5_1: (8, 32),
          T.Q2_K: (2, 16), T.Q3_K: (3, 16), T.Q4_K: (4, 32), T.Q5_K: (8, 32), T.Q6_K: (8, 16)}
SUPPORTED = (*FLOAT_TYPES, *PACKED, T.MXFP4)
FP16_MAX = 65504.0


def type_name(t: int) -> str:
    try:
        return T(t).name
    except ValueError:
        return f"type {t}"


def row_bytes(t: T, cols: int) -> int:
    bs, ts = GGML_QUANT_SIZES[t]
    return cols // bs * ts


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two uint8 columns [N, 2] (little-endian fp16) -> float32 [N, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, M, 16·k] -> [N, M, 2, 16·k]: low nibbles, then high nibbles (ggml's order)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits_of(x: torch.Tensor, count: int, width: int = 1) -> torch.Tensor:
    """uint8 [N, M, L] -> [N, M, count, L]: field i is (x >> (width·i)) & mask."""
    shifts = torch.arange(count, dtype=torch.uint8).view(1, 1, count, 1) * width
    return (x.unsqueeze(2) >> shifts) & ((1 << width) - 1)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes of packed 6-bit (scale, min) -> two uint8 [N, 8]."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def decode(blocks: torch.Tensor, t: T):
    """uint8 blocks [N, ts] -> (codes uint8 [N, K], a float32 [N, K/group], b float32 [N, K/group] or
    None, offset): w = a·q + b, or, for the symmetric types, w = a·(q - offset) with an integer offset."""
    n = blocks.shape[0]
    if t == T.Q8_0:
        d = _f16(blocks[:, :2])
        q = (blocks[:, 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return q, d, None, 128
    if t in (T.Q4_0, T.Q4_1):
        d = _f16(blocks[:, :2])
        off = 2 if t == T.Q4_0 else 4
        q = _nibbles(blocks[:, off:].view(n, 1, 16)).reshape(n, 32)
        return (q, d, None, 8) if t == T.Q4_0 else (q, d, _f16(blocks[:, 2:4]), None)
    if t in (T.Q5_0, T.Q5_1):
        d = _f16(blocks[:, :2])
        off = 2 if t == T.Q5_0 else 4
        qh = _bits_of(blocks[:, off:off + 4].reshape(n, 4, 1), 8).reshape(n, 32)  # bit j of the u32 -> weight j
        q = _nibbles(blocks[:, off + 4:].view(n, 1, 16)).reshape(n, 32) | (qh << 4)
        return (q, d, None, 16) if t == T.Q5_0 else (q, d, _f16(blocks[:, 2:4]), None)
    if t == T.Q2_K:
        scales, qs = blocks[:, :16], blocks[:, 16:80]
        d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
        q = _bits_of(qs.reshape(n, 2, 32), 4, 2).reshape(n, 256)  # weight h·128 + s·32 + l
        return q, d * (scales & 0x0F).float(), -dmin * (scales >> 4).float(), None
    if t == T.Q3_K:
        hmask, qs, s, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
        low = torch.stack((s[:, :8] & 0x0F, s[:, :8] >> 4), dim=1).reshape(n, 16)
        high = _bits_of(s[:, 8:12].reshape(n, 1, 4), 4, 2).reshape(n, 16)
        sc = (low | (high << 4)).float() - 32
        ql = _bits_of(qs.reshape(n, 2, 32), 4, 2).reshape(n, 256)
        qh = _bits_of(hmask.reshape(n, 1, 32), 8).reshape(n, 256)
        return ql | (qh << 2), d * sc, None, 4
    if t in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scale_min(blocks[:, 4:16])
        qs = blocks[:, 16:144] if t == T.Q4_K else blocks[:, 48:176]
        q = _nibbles(qs.reshape(n, 4, 32)).reshape(n, 256)  # weight c·64 + nibble·32 + l
        if t == T.Q5_K:
            q = q | (_bits_of(blocks[:, 16:48].reshape(n, 1, 32), 8).reshape(n, 256) << 4)
        return q, d * sc.float(), -dmin * mn.float(), None
    if t == T.Q6_K:
        ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], _f16(blocks[:, 208:210])
        low = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 256)  # weight h·128 + nibble·64 + l
        high = _bits_of(qh.reshape(n, 2, 32), 4, 2).reshape(n, 256)  # weight h·128 + s·32 + l
        return low | (high << 4), d * sc.view(torch.int8).float(), None, 32
    raise ValueError(f"no packed form for {type_name(t)}")


def to_quantized(raw: torch.Tensor, t: T, shape: tuple[int, int]) -> QuantizedWeight:
    """Raw bytes of a [out, in] ggml matrix (uint8, [out, in / bs · ts]) -> a QuantizedWeight."""
    bits, group = PACKED[t]
    out_f, in_f = shape
    bs, ts = GGML_QUANT_SIZES[t]
    q, a, b, offset = decode(raw.reshape(-1, ts), t)  # [N, K], [N, K/group] x 2
    if offset is not None:  # the zero is that integer exactly; only a is rounded (to fp16)
        codes = q.reshape(out_f, in_f)
        scale = a.reshape(out_f, -1).to(torch.float16)
        return QuantizedWeight(pack(codes, bits), scale, torch.full_like(scale, offset), bits, group, (out_f, in_f))
    zero_scale = a == 0
    a16 = a.to(torch.float16).float()
    zero = torch.where(zero_scale, torch.ones_like(a), -b / torch.where(zero_scale, torch.ones_like(a), a16))
    constant = zero_scale | (zero.abs() > FP16_MAX)  # a group whose codes do not matter: w = b
    scale = torch.where(constant, b, a16)
    zero = torch.where(constant, -torch.ones_like(zero), zero)
    q = q.view(-1, a.shape[1], group)  # [N, groups, group]
    q = torch.where(constant.unsqueeze(-1), torch.zeros_like(q), q)
    codes = q.reshape(out_f, in_f)
    return QuantizedWeight(pack(codes, bits), scale.reshape(out_f, -1).to(torch.float16),
                           zero.reshape(out_f, -1).to(torch.float16), bits, group, (out_f, in_f))


def to_mxfp4(raw: torch.Tensor, shape: tuple[int, int]) -> MXFP4Weight:
    """ggml MXFP4 blocks (e, qs[16]: weight j low nibble, j+16 high) -> ours (weight 2j low, 2j+1 high)."""
    out_f, in_f = shape
    blocks = raw.reshape(out_f, in_f // 32, 17)
    codes = _nibbles(blocks[..., 1:].reshape(-1, 1, 16)).reshape(out_f, in_f // 32, 32)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return MXFP4Weight(packed.contiguous(), blocks[..., 0].contiguous())


def dequantize(raw: np.ndarray, t: T, shape: tuple[int, ...]) -> torch.Tensor:
    """Any type the gguf package can dequantize -> float32 tensor of `shape` (its reference)."""
    import gguf.quants

    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, t), dtype=np.float32)).reshape(shape)


def requantized(raw: np.ndarray, t: T, shape: tuple[int, int], bits: int) -> QuantizedWeight:
    """A type with no exact packed form, dequantized by the gguf package and quantized again (RTN)."""
    return quantize_weight(dequantize(raw, t, shape), bits, 32, "rtn")
