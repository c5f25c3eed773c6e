"""MXFP4, the OCP microscaling 4-bit float format gpt-oss publishes its experts in.

A weight [out, in] is `blocks`, uint8 [out, in/32, 16]: 32 E2M1 codes per block, two per byte (low
nibble first), and `scales`, uint8 [out, in/32]: one E8M0 exponent per block, value 2^(scale - 127).
That is 4.25 bits per weight. An `MXFP4Weight` keeps them packed (host tier, device slots) and
dequantizes on use; it has the `tensors()` / `with_tensors()` / `linear()` interface the expert
layout and `expert_forward` use for quantized weights.

Per call nothing is copied to the device: the 16 E2M1 values and the 256 E8M0 powers of two are
tables made once per device; codes index them as int32, a chunk of rows at a time
(prefill.chunked_linear), so the temporaries stay bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prefill import chunked_linear

BLOCK = 32  # weights per scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def is_mxfp4(quantization_config) -> bool:
    """Whether a config.json's quantization_config is transformers' MXFP4 (gpt-oss as published)."""
    return isinstance(quantization_config, dict) and quantization_config.get("quant_method") == "mxfp4"


def nbytes_for(out_features: int, in_features: int) -> int:
    """Bytes of one MXFP4 [out, in] weight: 16 code bytes and 1 scale byte per 32 weights."""
    return out_features * (in_features // BLOCK) * 17


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(E2M1 values [16], E8M0 scales 2^(e - 127) [256]) as fp32 on `device`, made once per device."""
    device = torch.device(device)
    if device not in _TABLES:
        values = torch.tensor(FP4_VALUES, dtype=torch.float32)
        scales = torch.ldexp(torch.ones(256), torch.arange(256, dtype=torch.int32) - 127)
        _TABLES[device] = (values.to(device), scales.to(device))
    return _TABLES[device]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., G, 16], scales [..., G] -> weights [..., G*32] in `dtype`."""
    values, powers = tables(blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int32)      # [..., G, 16, 2]
    v = torch.index_select(values, 0, codes.view(-1)).view(*blocks.shape[:-1], 32)  # [..., G, 32]
    s = torch.index_select(powers, 0, scales.reshape(-1).to(torch.int32)).view(*scales.shape, 1)  # [..., G, 1]
    return (v * s).flatten(-2).to(dtype)


@dataclass
class MXFP4Weight:
    blocks: torch.Tensor  # uint8 [out, in/32, 16]
    scales: torch.Tensor  # uint8 [out, in/32]

    @property
    def packed(self) -> torch.Tensor:
        return self.blocks

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] * BLOCK

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.blocks, self.scales, dtype)

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.blocks[r0:r1], self.scales[r0:r1], dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return chunked_linear(x, self)

    def to(self, device, non_blocking: bool = False) -> MXFP4Weight:
        return MXFP4Weight(self.blocks.to(device, non_blocking=non_blocking),
                           self.scales.to(device, non_blocking=non_blocking))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks, "scales": self.scales}

    def with_tensors(self, t: dict[str, torch.Tensor]) -> MXFP4Weight:
        return MXFP4Weight(t["blocks"], t["scales"])
