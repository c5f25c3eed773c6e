"""NF4 experts (QLoRA's 4-bit NormalFloat), computed through bitsandbytes on CUDA when it is installed.

`load(..., nf4_experts=True)` quantizes float experts at load: each block of 64 consecutive weights
(row-major over the whole matrix) is scaled by its absolute maximum and rounded to the nearest of the
16 NF4 levels; codes are packed two per byte, high nibble first, with one fp32 absmax per block —
exactly bitsandbytes' `quantize_4bit(..., quant_type="nf4")` layout, so on CUDA the same bytes go
straight to `bitsandbytes.matmul_4bit` (its fast batch-1 kernel). Without bitsandbytes (or on the
CPU) the plain torch path dequantizes and multiplies: correct everywhere, just slower. Like the
other packed weights, an `NF4Weight` stays packed in the host tier and in device slots.

Per call nothing is copied to the device: the level table (and bitsandbytes' code) is made once per
device and cached; codes are looked up with int32 indices, a chunk of rows at a time
(prefill.chunked_linear), so the temporaries stay ~100 MB instead of ~1 GB per expert matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from .prefill import chunked_linear

BLOCK = 64
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def _bnb():
    try:
        import bitsandbytes
        return bitsandbytes
    except ImportError:
        return None


_LEVELS: dict[torch.device, torch.Tensor] = {}
_BNB_CODE: dict[torch.device, torch.Tensor] = {}


def levels(device: torch.device) -> torch.Tensor:
    """The 16 NF4 levels as fp32 on `device`, made once per device."""
    device = torch.device(device)
    if device not in _LEVELS:
        _LEVELS[device] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return _LEVELS[device]


def _bnb_code(bnb, device: torch.device) -> torch.Tensor:
    if device not in _BNB_CODE:
        _BNB_CODE[device] = bnb.functional.get_4bit_type("nf4", device=device)
    return _BNB_CODE[device]


@dataclass
class NF4Weight:
    packed: torch.Tensor   # uint8 [out * in / 2]: two codes per byte, high nibble first
    absmax: torch.Tensor   # fp32 [out * in / 64]: one scale per block
    shape: tuple[int, int]  # (out, in)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "NF4Weight":
        if w.numel() % BLOCK:
            raise ValueError(f"NF4 needs a weight whose size is a multiple of {BLOCK}, got {list(w.shape)}")
        blocks = w.detach().float().reshape(-1, BLOCK)                        # (n/64, 64)
        absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        lv = levels(w.device)
        normed = (blocks / absmax[:, None]).reshape(-1, 1)                    # (n, 1)
        codes = torch.empty(normed.shape[0], dtype=torch.uint8, device=w.device)
        for start in range(0, normed.shape[0], 1 << 20):                       # bound the (chunk, 16) temp
            part = normed[start:start + (1 << 20)]
            codes[start:start + part.shape[0]] = (part - lv).abs().argmin(dim=1).to(torch.uint8)
        packed = (codes[0::2] << 4) | codes[1::2]
        return cls(packed, absmax, tuple(w.shape))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 4 * self.absmax.numel()

    @property
    def rows_multiple(self) -> int:
        """Row chunks of this many rows hold whole 64-weight blocks."""
        return BLOCK // math.gcd(self.shape[1], BLOCK)

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows r0:r1 ([r1 - r0, in]); r0 and r1 multiples of `rows_multiple` (or r1 = out)."""
        in_f = self.shape[1]
        packed = self.packed[r0 * in_f // 2:r1 * in_f // 2]
        absmax = self.absmax[r0 * in_f // BLOCK:-(-r1 * in_f // BLOCK)]
        codes = torch.stack((packed >> 4, packed & 0x0F), dim=1).view(-1).to(torch.int32)  # [n] int32, not int64
        w = torch.index_select(levels(packed.device), 0, codes).view(-1, BLOCK) * absmax[:, None]  # [n/64, 64]
        return w.view(r1 - r0, in_f).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(0, self.shape[0], dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb() if x.is_cuda else None
        if bnb is None:
            return chunked_linear(x, self, rows_multiple=self.rows_multiple)
        state = bnb.functional.QuantState(
            absmax=self.absmax, shape=torch.Size(self.shape), blocksize=BLOCK, quant_type="nf4", dtype=x.dtype,
            code=_bnb_code(bnb, x.device))
        return bnb.matmul_4bit(x, self.packed.view(-1, 1).t(), quant_state=state)

    def to(self, device, non_blocking: bool = False) -> "NF4Weight":
        return NF4Weight(self.packed.to(device, non_blocking=non_blocking),
                         self.absmax.to(device, non_blocking=non_blocking), self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"nf4": self.packed, "absmax": self.absmax}

    def with_tensors(self, t: dict[str, torch.Tensor]) -> "NF4Weight":
        return NF4Weight(t["nf4"], t["absmax"], self.shape)
