"""The packed CPU kernels against float64 math, for every width, group size and batch size.

The oracle is `x @ ((code - zero) * scale).T` computed in float64 from the stored codes, scales and
zeros; the kernels compute from bf16 activations and bf16 scales with fp32 sums, so they agree
within `TOLERANCE` (relative Frobenius error; quant/cpu_int4.py documents it). Dense linears of a
quantized checkpoint run through the same kernel on the CPU (QLinear), never dequantizing whole.
"""

import pytest
import torch

import offload_moe
from conftest import save, tiny_mixtral
from offload_moe.kernels import quantize
from offload_moe.kernels import cpu_forms, cpu_int4
from offload_moe.kernels.cpu_forms import CPU_FORMS
from offload_moe.kernels.cpu_int4 import TOLERANCE, Int4Planes, to_int4_planes
from offload_moe.kernels.modules import QLinear

needs_layout = pytest.mark.skipif(cpu_int4._block_rows() is None,
                                  reason="this torch build packs int4 in a layout the dequantizer does not know")


def float64_linear(x: torch.Tensor, qw) -> torch.Tensor:
    O, I = qw.shape
    codes = qw.codes().double().view(O, -1, qw.group_size)                      # (O, G, group)
    w = (codes - qw.zeros.double()[..., None]) * qw.scales.double()[..., None]   # (O, G, group)
    return x.double() @ w.view(O, I).t()


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("tokens", [1, 3, cpu_int4.DEQUANT_MIN_TOKENS + 5])
def test_packed_kernel_matches_float64(bits, group, tokens):
    g = torch.Generator().manual_seed(bits * 100 + group + tokens)
    shape = (320, 512)  # 320 rows: not a multiple of the chunk, a multiple of the layout block
    qw = quantize(torch.randn(shape, generator=g) * 0.02, bits, group)
    planes = to_int4_planes(qw)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(tokens, shape[1], generator=g).to(dtype)
        y = planes.linear(x)
        assert y.dtype == dtype and y.shape == (tokens, shape[0])
        assert rel_error(y, float64_linear(x, qw)) < TOLERANCE


@needs_layout
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantized_rows_are_the_weight(bits):
    qw = quantize(torch.randn(192, 256) * 0.02, bits, 64)
    planes = to_int4_planes(qw)
    B = cpu_int4._block_rows()[0]
    w = planes.dequantize_rows(B, 3 * B, torch.float32)
    ref = qw.dequantize(torch.float64)[B:3 * B]
    assert w.shape == ref.shape and rel_error(w, ref) < TOLERANCE  # bf16 scales and offsets


@needs_layout
def test_long_prefill_dequantizes_in_bounded_chunks(monkeypatch):
    """At DEQUANT_MIN_TOKENS tokens the product goes through row chunks, never the whole matrix."""
    qw = quantize(torch.randn(1024, 128) * 0.02, 4, 64)
    planes = to_int4_planes(qw)
    seen = []
    original = Int4Planes.dequantize_rows
    monkeypatch.setattr(Int4Planes, "dequantize_rows",
                        lambda self, r0, r1, dtype=torch.bfloat16: seen.append(r1 - r0) or original(self, r0, r1, dtype))
    x = torch.randn(cpu_int4.DEQUANT_MIN_TOKENS, 128)
    assert rel_error(planes.linear(x), float64_linear(x, qw)) < TOLERANCE
    assert seen and max(seen) <= cpu_int4.DEQUANT_CHUNK_ROWS and sum(seen) == 1024
    seen.clear()
    planes.linear(x[:1])
    assert seen == []  # decode multiplies from the packed form


def test_quantized_attention_runs_packed_on_the_cpu(tmp_path, monkeypatch):
    """A checkpoint quantized with int4 attention and int8 embeddings: every dense QLinear holds the
    kernel's form, and the logits match the dequantize-then-multiply reference within tolerance."""
    from offload_moe.kernels import modules
    from offload_moe.tools.convert import quantize as convert

    src = save(tiny_mixtral(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
               tmp_path / "src")
    dst = tmp_path / "int4"
    convert(src, dst, experts="int4", attention="int4", embeddings="int8", group_size=32, method="rtn", device="cpu")
    ids = torch.tensor([[1, 17, 42, 5, 66, 23, 9]])
    model = offload_moe.load(dst, device="cpu", dtype=torch.float32)
    qlinears = {n: m for n, m in model.transformer.named_modules() if isinstance(m, QLinear)}
    assert len(qlinears) == 3 * 4 + 1 and all(isinstance(m.qw, CPU_FORMS) for m in qlinears.values())
    monkeypatch.setattr(modules, "has_cpu_kernel", lambda qw: False)  # the packed bytes as stored
    stored = {n: m.qw for n, m in offload_moe.load(dst, device="cpu", dtype=torch.float32).transformer.named_modules()
              if isinstance(m, QLinear)}
    for attn in model.transformer.modules():  # each projection on its own, so every QLinear is seen
        if hasattr(attn, "qkv"):              # (the fused q/k/v call is bitwise these: test_cpu_qmv.py)
            attn.qkv = None
    calls = []
    for name, m in qlinears.items():
        m.register_forward_hook(lambda m, args, out, name=name: calls.append((name, args[0], out)))
    for tokens in (ids, ids[:, :1]):  # prefill and a decode-sized call
        model.logits(tokens)
    assert {name for name, _, _ in calls} == set(qlinears)
    for name, x, y in calls:
        assert rel_error(y, float64_linear(x, stored[name])) < cpu_forms.TOLERANCE, name
