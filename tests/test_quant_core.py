"""The quantization core: bit packing, groupwise RTN/HQQ, byte counts, qlinear, state dicts, kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_moe.kernels import SUPPORTED_BITS, QuantizedWeight, nbytes_for, pack, packed_cols, qlinear, quantize, unpack
from offload_moe.kernels import groupwise, kernels_triton


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two shared cores: keep this file to one thread, and give the rest of the session its setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def realistic_weight(out: int, inn: int, seed: int, kind: str = "student") -> torch.Tensor:
    """LM-like weights: heavy-tailed (Student-t, nu=4, or Laplace), std ~0.01, 0.1% outliers x8."""
    g = torch.Generator().manual_seed(seed)
    if kind == "student":  # t = N / sqrt(chi2_nu / nu), nu = 4, from the seeded generator
        n = torch.randn(out, inn, generator=g, dtype=torch.float64)
        chi2 = torch.randn(4, out, inn, generator=g, dtype=torch.float64).pow(2).sum(0)
        w = n / (chi2 / 4).sqrt() * 0.01
    else:  # Laplace via the inverse CDF
        u = torch.rand(out, inn, generator=g, dtype=torch.float64) - 0.5
        w = -0.01 * u.sign() * torch.log1p(-2 * u.abs())
    outliers = torch.rand(out, inn, generator=g) < 1e-3
    w[outliers] *= 8
    return w.float()


def mse(qw: QuantizedWeight, w: torch.Tensor) -> float:
    return (qw.dequantize(torch.float64) - w.double()).pow(2).mean().item()


# ---------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), rows=st.integers(1, 5), cols=st.integers(1, 70),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_lossless(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, (cols * bits + 7) // 8)  # true `bits` per value, rounded per row
    assert torch.equal(unpack(packed, bits, cols), codes)


def test_pack_extremes_and_row_slices():
    for bits in SUPPORTED_BITS:
        top = 2**bits - 1
        codes = torch.tensor([[top] * 19, [0] * 19, [top, 0] * 9 + [top]], dtype=torch.uint8)
        packed = pack(codes, bits)
        assert torch.equal(unpack(packed, bits, 19), codes)
        assert torch.equal(unpack(packed[1:], bits, 19), codes[1:])  # a row slice unpacks alone


def test_pack_layout_is_lsb_first_bitstream():
    """The kernel relies on this layout: code c at bits [bits*c, bits*(c+1)) of the row, little-endian."""
    assert pack(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x03]]
    assert pack(torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0x01]]
    codes = [5, 1, 7, 2, 6, 3, 0, 4, 6]
    packed = pack(torch.tensor([codes], dtype=torch.uint8), 3)
    assert packed.shape == (1, 4)  # 27 bits -> 4 bytes; 8 codes fill exactly 3
    stream = int.from_bytes(bytes(packed[0].tolist()), "little")
    assert [(stream >> (3 * i)) & 7 for i in range(9)] == codes


def test_packed_cols():
    assert [packed_cols(8, b) for b in (2, 3, 4, 8)] == [2, 3, 4, 8]
    assert [packed_cols(4096, b) for b in (2, 3, 4, 8)] == [1024, 1536, 2048, 4096]
    assert packed_cols(12, 3) == 5  # 36 bits round up to whole bytes per row


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="unsupported bit width 5"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="uint8"):
        pack(torch.zeros(1, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="expected 4"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)


# ---------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rtn_error_within_half_step(bits, group_size):
    w = realistic_weight(48, 256, seed=bits * 1000 + group_size)
    w[3, :group_size] = 0.5 + w[3, :group_size].abs()  # a group that does not straddle zero
    qw = quantize(w, bits, group_size, method="rtn")
    qmax = 2**bits - 1
    s = qw.scales.double().repeat_interleave(group_size, dim=1)  # [out, in]
    z = qw.zeros.double().repeat_interleave(group_size, dim=1)
    err = (qw.dequantize(torch.float32).double() - w.double()).abs()
    # half a step, plus what fp16 rounding of scale and zero can push a code past the clamp
    bound = s * (0.5 + 2.0**-11 * (qmax + z.abs())) + 1e-6 * w.double().abs() + 1e-12
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3e}"
    codes = qw.codes()
    assert int(codes.max()) <= qmax
    # the codes are round(w/scale + zero) for the stored fp16 scale and zero (not off by one)
    ideal = (w.double() / s + z).round().clamp(0, qmax)
    assert (ideal - codes.double()).abs().max().item() <= 1
    assert (ideal != codes.double()).double().mean().item() < 1e-3


def test_degenerate_groups_reconstruct_exactly():
    w = torch.zeros(4, 64)
    w[1] = 0.25
    w[2] = -3.0
    w[3, :32] = 1e-3  # two groups of 32: constant and zero
    for bits in SUPPORTED_BITS:
        for method in ("rtn", "hqq"):
            qw = quantize(w, bits, 32, method=method)
            assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
            torch.testing.assert_close(qw.dequantize(), w, rtol=2e-3, atol=0)


@pytest.mark.parametrize("kind", ["student", "laplace"])
def test_hqq_beats_rtn(kind):
    w = realistic_weight(256, 1024, seed=7, kind=kind)
    for bits in (2, 3, 4):
        rtn = mse(quantize(w, bits, 64, "rtn"), w)
        hqq = mse(quantize(w, bits, 64, "hqq"), w)
        refit = mse(quantize(w, bits, 64, "hqq", refit_scale=True), w)
        assert hqq < 0.97 * rtn, (bits, hqq, rtn)
        assert refit < hqq, (bits, refit, hqq)


@pytest.mark.parametrize("iters,p,beta,kappa", [(20, 0.7, 10.0, 1.01), (10, 0.5, 1e3, 0.8)])
def test_hqq_matches_reference_transcription(iters, p, beta, kappa):
    """hqq's optimize_weights_proximal_legacy (inverse-scale convention), without its early stop."""
    from offload_moe.kernels import hqq
    from offload_moe.kernels.groupwise import rtn_params

    wg = realistic_weight(64, 256, seed=11).reshape(-1, 64)
    scale, zero = rtn_params(wg, 7)
    inv, z, b = 1.0 / scale, zero.clone(), beta
    for _ in range(iters):
        w_q = torch.round(wg * inv + z).clamp(0, 7)
        w_r = (w_q - z) / inv
        d = wg - w_r
        w_e = torch.sign(d) * torch.relu(d.abs() - (1.0 / b) * d.abs().pow(p - 1))
        z = torch.mean(w_q - (wg - w_e) * inv, dim=1, keepdim=True)
        b *= kappa
    ours = hqq.optimize_zero(wg, scale, zero, 7, iters=iters, lp_norm=p, beta=beta, kappa=kappa)
    diff = (ours - z).abs()  # float order differs, so a code at a rounding tie may flip now and then
    assert diff.max() < 0.05 and (diff <= 1e-5).double().mean() > 0.99, diff.max()
    assert (ours - zero).abs().max() > 0.05  # it moved: comparing two no-ops would prove nothing


def test_quantize_is_deterministic_and_chunk_invariant(monkeypatch):
    w = realistic_weight(40, 192, seed=3)
    a = quantize(w, 3, 64, "hqq")
    monkeypatch.setattr(groupwise, "CHUNK_ELEMENTS", 192 * 7)  # 7 rows per chunk, last one short
    b = quantize(w.to(torch.bfloat16).float(), 3, 64, "hqq")
    c = quantize(w, 3, 64, "hqq")
    for x, y in ((a.packed, c.packed), (a.scales, c.scales), (a.zeros, c.zeros)):
        assert torch.equal(x, y)
    assert not torch.equal(a.zeros, b.zeros)  # different input, different result: the check can fail


def test_bf16_input():
    w = realistic_weight(16, 128, seed=4).to(torch.bfloat16)
    assert torch.equal(quantize(w, 4).packed, quantize(w.float(), 4).packed)


# ---------------------------------------------------------------- byte counts


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape,group_size", [((96, 256), 64), ((7, 12), 4), ((5, 40), 8), ((3, 96), 32)])
def test_nbytes_exact(bits, shape, group_size):
    out, inn = shape
    qw = quantize(torch.randn(shape), bits, group_size)
    packed_bytes = out * -(-inn * bits // 8)  # bits*params/8, rounded up per row
    expected = packed_bytes + 2 * 2 * (out * inn // group_size)
    assert qw.nbytes == expected == nbytes_for(shape, bits, group_size)
    if (inn * bits) % 8 == 0:
        assert packed_bytes == bits * out * inn // 8


def test_mixtral_expert_byte_ratios():
    shape = (14336, 4096)
    bf16 = 2 * shape[0] * shape[1]
    params = shape[0] * shape[1]
    assert nbytes_for(shape, 4) == params // 2 + 4 * params // 64
    assert nbytes_for(shape, 4) / bf16 == pytest.approx(0.28125)
    assert nbytes_for(shape, 2) / bf16 == pytest.approx(0.15625)
    assert 0.27 < nbytes_for(shape, 4) / bf16 < 0.29
    assert 0.15 < nbytes_for(shape, 2) / bf16 < 0.165
    assert nbytes_for(shape, 3) / bf16 == pytest.approx(0.21875)


# ---------------------------------------------------------------- user errors


@pytest.mark.parametrize("call,needle", [
    (lambda w: quantize(w, 5), "unsupported bit width 5"),
    (lambda w: quantize(w, 4, method="gptq"), "'gptq'"),
    (lambda w: quantize(w, 4, group_size=48), "group size 48"),
    (lambda w: quantize(w, 4, group_size=0), "group size 0"),
    (lambda w: quantize(w[0], 4), "2-D"),
    (lambda w: quantize(w[:0], 4), "empty"),
    (lambda w: quantize(w.long(), 4), "float"),
    (lambda w: quantize(w.index_fill(1, torch.tensor([3]), float("nan")), 4), "NaN"),
    (lambda w: qlinear(torch.randn(2, 64), quantize(w, 4)), "64 features"),
])
def test_bad_inputs_raise_one_line_errors(call, needle):
    w = torch.randn(8, 128)
    with pytest.raises(ValueError) as info:
        call(w)
    message = str(info.value)
    assert needle in message and "\n" not in message


# ---------------------------------------------------------------- qlinear


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_qlinear_matches_dequantized_linear(bits):
    g = torch.Generator().manual_seed(bits)
    w = realistic_weight(48, 128, seed=bits)
    qw = quantize(w, bits, 32, "hqq")
    bias = torch.randn(48, generator=g)
    x = torch.randn(2, 3, 128, generator=g)
    y = qlinear(x, qw)
    assert y.shape == (2, 3, 48) and y.dtype == torch.float32
    assert torch.equal(y, F.linear(x, qw.dequantize(torch.float32)))
    assert torch.equal(qlinear(x, qw, bias), F.linear(x, qw.dequantize(torch.float32), bias))
    # independent float64 reference from the raw codes: (q - zero) * scale, groups along `in`
    q = qw.codes().double().view(48, -1, 32)
    w64 = ((q - qw.zeros.double()[..., None]) * qw.scales.double()[..., None]).view(48, 128)
    torch.testing.assert_close(y.double(), x.double() @ w64.T, rtol=1e-5, atol=1e-6)
    xb = x.to(torch.bfloat16)
    yb = qlinear(xb, qw)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, F.linear(xb, qw.dequantize(torch.bfloat16)))


# ---------------------------------------------------------------- state dicts


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_state_dict_round_trip(bits, tmp_path):
    from safetensors.torch import load_file, save_file

    qw = quantize(realistic_weight(24, 192, seed=bits), bits, 64, "hqq")
    prefix = "model.layers.0.block_sparse_moe.experts.3.w1"
    sd = qw.state_dict(prefix)
    assert sorted(sd) == [f"{prefix}.qweight", f"{prefix}.scales", f"{prefix}.zeros"]
    save_file(sd, str(tmp_path / "q.safetensors"))
    loaded = load_file(str(tmp_path / "q.safetensors"))
    back = QuantizedWeight.from_state_dict(loaded, prefix, bits, 64, (24, 192))
    for name in ("packed", "scales", "zeros"):
        assert torch.equal(getattr(back, name), getattr(qw, name))
    assert back.nbytes == qw.nbytes and back.shape == (24, 192)
    assert torch.equal(back.dequantize(), qw.dequantize())
    moved = back.to("cpu")
    assert torch.equal(moved.dequantize(torch.bfloat16), qw.dequantize(torch.bfloat16))


def test_from_state_dict_rejects_mismatch():
    qw = quantize(torch.randn(8, 128), 4, 64)
    sd = qw.state_dict("w")
    with pytest.raises(ValueError, match="missing tensor 'w.zeros'"):
        QuantizedWeight.from_state_dict({k: v for k, v in sd.items() if k != "w.zeros"}, "w", 4, 64, (8, 128))
    with pytest.raises(ValueError, match=r"qweight .* expected torch.uint8 \[8, 48\]"):
        QuantizedWeight.from_state_dict(sd, "w", 3, 64, (8, 128))  # 4-bit tensors read as 3-bit
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight.from_state_dict(sd, "w", 4, 32, (8, 128))
    with pytest.raises(ValueError, match="zeros"):
        QuantizedWeight.from_state_dict({**sd, "w.zeros": sd["w.zeros"].float()}, "w", 4, 64, (8, 128))


# ---------------------------------------------------------------- Triton kernel

# The kernels themselves against float64: tests/test_triton_kernels.py.

needs_cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and kernels_triton.HAS_TRITON),
                                       reason="needs a CUDA GPU with triton installed")


@needs_cuda_triton
def test_qlinear_dispatches_to_kernel_on_cuda(monkeypatch):
    calls = []
    real = kernels_triton.dequant_matmul
    monkeypatch.setattr(kernels_triton, "dequant_matmul", lambda *a: calls.append(1) or real(*a))
    qw = quantize(realistic_weight(256, 512, seed=1), 4, 64, "hqq").to("cuda")
    x = torch.randn(3, 512, device="cuda", dtype=torch.float16)
    fused = qlinear(x, qw, use_triton=True)
    ref = qlinear(x, qw, use_triton=False)
    assert calls == [1]  # the fused path ran once, the reference path not through it
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-2)
