"""Bit-packing of small unsigned integer codes into uint8 storage.

Why: a 4-bit expert must occupy 4 bits per weight in RAM, on disk and on the PCIe bus, or
quantization buys nothing for offloading. The layout is one LSB-first bit stream per row:
code `c` of a row occupies bits `[bits*c, bits*(c+1))` of that row's bytes, read little-endian.
So for 2/4/8 bits code `c` sits in byte `c*bits // 8` at shift `c*bits % 8`, and for 3 bits
eight codes fill exactly three bytes (a code may straddle two bytes). Packing runs along the
last (input) dimension, so a row slice of the packed tensor stays contiguous and a kernel can
find any code with `byte = (bits*c) >> 3, shift = (bits*c) & 7`.

Everything is vectorised; the only Python loops run over the <= 8 codes of one packing word.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}: expected one of {', '.join(map(str, SUPPORTED_BITS))}")


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per packed row: ceil(cols * bits / 8)."""
    check_bits(bits)
    return (cols * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [R, C] in [0, 2**bits) -> uint8 [R, ceil(C*bits/8)]."""
    check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D uint8 tensor, got {codes.dim()}-D {codes.dtype}")
    rows, cols = codes.shape
    out_cols = packed_cols(cols, bits)
    top = int(codes.max()) if codes.numel() else 0  # the shifts below assume in-range codes
    if top >> bits:
        raise ValueError(f"code {top} does not fit in {bits} bits: expected values in [0, {(1 << bits) - 1}]")
    if bits == 8:
        return codes.contiguous().clone()
    # A packing word is 8 codes = `bits` bytes; pad the row to whole words, trim the bytes after.
    pad = (-cols) % 8
    c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes  # [R, 8W]
    c = c.reshape(rows, -1, 8)  # [R, W, 8]
    if 8 % bits == 0:
        per_byte = 8 // bits
        c = c.reshape(rows, -1, per_byte)  # [R, W*bits, per_byte]
        out = c[..., 0].clone()
        for i in range(1, per_byte):
            out |= c[..., i] << (bits * i)  # uint8 shifts: bits above 7 fall off, none are set
        return out[:, :out_cols].contiguous()  # [R, ceil(C*bits/8)]
    # 3 bits: 8 codes -> one 24-bit word -> 3 bytes, little-endian.
    word = c[..., 0].to(torch.int32)  # [R, W]
    for i in range(1, 8):
        word |= c[..., i].to(torch.int32) << (bits * i)
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], dim=-1)  # [R, W, 3]
    return out.to(torch.uint8).reshape(rows, -1)[:, :out_cols].contiguous()  # [R, ceil(3C/8)]


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """uint8 [R, ceil(cols*bits/8)] -> uint8 codes [R, cols]; inverse of `pack`."""
    check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack expects a 2-D uint8 tensor, got {packed.dim()}-D {packed.dtype}")
    rows, have = packed.shape
    want = packed_cols(cols, bits)
    if have != want:
        raise ValueError(f"packed tensor has {have} bytes per row, expected {want} for {cols} {bits}-bit codes")
    if bits == 8:
        return packed.contiguous().clone()
    mask = (1 << bits) - 1
    pad = (-have) % bits  # whole words of `bits` bytes
    p = torch.nn.functional.pad(packed, (0, pad)) if pad else packed  # [R, W*bits]
    if 8 % bits == 0:
        per_byte = 8 // bits
        out = torch.stack([(p >> (bits * i)) & mask for i in range(per_byte)], dim=-1)  # [R, B, per_byte]
        return out.reshape(rows, -1)[:, :cols].contiguous()  # [R, C]
    p = p.reshape(rows, -1, bits).to(torch.int32)  # [R, W, 3]
    word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)  # [R, W]
    out = torch.stack([(word >> (bits * i)) & mask for i in range(8)], dim=-1)  # [R, W, 8]
    return out.to(torch.uint8).reshape(rows, -1)[:, :cols].contiguous()  # [R, C]
