"""Dequantize-then-multiply in bounded row chunks (quant/prefill.py) for every packed format, against
float64 math; NF4/MXFP4 tables made once per device (review finding #4)."""

import pytest
import torch

from offload_moe.kernels import mxfp4, nf4, quantize
from offload_moe.kernels.mxfp4 import FP4_VALUES, MXFP4Weight
from offload_moe.kernels.nf4 import NF4Weight
from offload_moe.kernels.prefill import chunk_rows, chunked_linear


def _mxfp4(out_f: int, in_f: int, seed: int) -> MXFP4Weight:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (out_f, in_f // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (out_f, in_f // 32), generator=g, dtype=torch.uint8)
    return MXFP4Weight(blocks, scales)


def _mxfp4_float64(w: MXFP4Weight) -> torch.Tensor:
    """The OCP definition, element by element in float64: low nibble first, value * 2^(e - 127)."""
    codes = torch.stack((w.blocks & 0x0F, w.blocks >> 4), dim=-1).flatten(-2).long()  # [out, G, 32]
    values = torch.tensor(FP4_VALUES, dtype=torch.float64)[codes]
    return (values * torch.pow(2.0, w.scales.double() - 127).unsqueeze(-1)).flatten(-2)


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(72, 96, generator=g) * 0.05
    return {"int4": quantize(w, 4, 32), "int3": quantize(w, 3, 32), "nf4": NF4Weight.quantize(w),
            "mxfp4": _mxfp4(72, 96, seed)}


@pytest.mark.parametrize("kind", ["int4", "int3", "nf4", "mxfp4"])
@pytest.mark.parametrize("limit", [96 * 5, 96 * 64, 1 << 23])  # many chunks, 2 chunks, one
def test_chunked_linear_matches_float64(kind, limit):
    w = _weights(0)[kind]
    w64 = _mxfp4_float64(w) if kind == "mxfp4" else w.dequantize(torch.float64)
    x = torch.randn(5, 3, 96, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(72)
    y = chunked_linear(x, w, bias, limit=limit, rows_multiple=getattr(w, "rows_multiple", 1))
    ref = x.double() @ w64.T + bias.double()
    bound = x.double().abs() @ w64.abs().T + bias.double().abs()
    assert y.shape == (5, 3, 72) and y.dtype == torch.float32
    assert bool(((y.double() - ref).abs() <= 1e-6 * bound + 1e-12).all())


def test_chunks_keep_nf4_blocks_whole():
    w = NF4Weight.quantize(torch.randn(48, 40))  # 40 weights a row: 8 rows = 5 blocks
    assert w.rows_multiple == 8 and chunk_rows(40, 100, 8) == 8 and chunk_rows(40, 1000, 8) == 24
    assert torch.equal(torch.cat([w.dequantize_rows(r, r + 8) for r in range(0, 48, 8)]), w.dequantize())


def test_mxfp4_dequantize_matches_float64():
    w = _mxfp4(8, 64, 3)
    assert torch.equal(w.dequantize(torch.float32).double(), _mxfp4_float64(w))


def test_lookup_tables_are_made_once_per_device(monkeypatch):
    w, m = NF4Weight.quantize(torch.randn(8, 64)), _mxfp4(8, 64, 0)
    w.dequantize(), m.dequantize()  # tables exist now
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    w.linear(torch.randn(2, 64)), m.linear(torch.randn(2, 64))
    assert made == [] and nf4.levels("cpu") is nf4.levels(torch.device("cpu"))
    assert mxfp4.tables("cpu")[0] is mxfp4.tables("cpu")[0]
