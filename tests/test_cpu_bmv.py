"""Our bf16 kernel (quant/bf16mv.c) against float64 math on every instruction path this CPU can
run, and where the model uses it: bf16 products of a few tokens (dense linears, q/k/v in one call,
whole experts), the same bits for any thread count and for a slot view and a resident tensor.

bf16 x bf16 products are exact in fp32, so the kernel's error is that of fp32 sums plus one
rounding to the output dtype: against float64, fp32 output within 1e-5 relative, bf16 output
within one bf16 rounding (2^-8 relative), like torch's own product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload_moe.kernels import cpu_bf16, native
from kernel_variants import VARIANTS, open_variant

if native.load("bmv") is None:
    pytest.skip(f"the bf16 kernel is not built here: {native.status('bmv')}", allow_module_level=True)

SHAPES = [(64, 32), (96, 1000), (1024, 2816), (37, 100)]   # tails of 8, 16 and 4 inputs included


@pytest.fixture(scope="module", params=VARIANTS)
def lib(request):
    """The package's library of one instruction-set variant (skipped where this CPU cannot run it)."""
    return open_variant(request.param, "bmv")


def bmv(lib, x, w, out_dtype=torch.float32, threads=2):
    y = torch.empty(x.shape[0], w.shape[0], dtype=out_dtype)
    assert lib.bmv(x.data_ptr(), y.data_ptr(), int(out_dtype == torch.bfloat16), x.shape[0], w.shape[0], w.shape[1],
                   w.data_ptr(), threads) == 0
    return y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_product_against_float64(lib, shape, tokens):
    g = torch.Generator().manual_seed(tokens)
    w = torch.randn(shape, generator=g).bfloat16()
    x = torch.randn(tokens, shape[1], generator=g).bfloat16()
    exact = x.double() @ w.double().t()
    y32 = bmv(lib, x, w)
    assert ((y32.double() - exact).abs() <= 1e-5 * exact.abs().max()).all()
    y16 = bmv(lib, x, w, torch.bfloat16)
    assert ((y16.double() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-5 * exact.abs().max()).all()
    assert torch.equal(bmv(lib, x, w, threads=1), y32)          # rows are never split across threads


def test_a_slot_view_and_a_resident_tensor_give_the_same_bits():
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(3 * 1024 * 96 + 7, generator=g).bfloat16()
    view = flat[7:7 + 1024 * 96].view(1024, 96)                 # an unaligned view, as in a slot buffer
    x = torch.randn(2, 96, generator=g).bfloat16()
    assert torch.equal(cpu_bf16.small_linear(x, view), cpu_bf16.small_linear(x, view.clone()))


def test_whole_expert_in_one_call(lib):
    g = torch.Generator().manual_seed(3)
    H, F_ = 96, 160
    w1, w3 = (torch.randn(F_, H, generator=g).bfloat16() * 0.2 for _ in range(2))
    w2 = torch.randn(H, F_, generator=g).bfloat16() * 0.2
    for n in (1, 4):
        x = torch.randn(n, H, generator=g).bfloat16()
        y = torch.empty(n, H, dtype=torch.float32)
        assert lib.bmv_swiglu(x.data_ptr(), y.data_ptr(), 0, n, H, F_, w1.data_ptr(), w3.data_ptr(), w2.data_ptr(),
                              2) == 0
        xd = x.double()
        exact = F.linear(F.silu(F.linear(xd, w1.double())) * F.linear(xd, w3.double()), w2.double())
        # the hidden activations are rounded to bf16, as the torch path rounds them
        assert ((y.double() - exact).norm() / exact.norm()).item() < 2 ** -7


def test_the_model_side_takes_few_tokens_only():
    w = torch.randn(64, 32).bfloat16()
    assert cpu_bf16.small_linear(torch.randn(cpu_bf16.BMV_MAX_TOKENS + 1, 32).bfloat16(), w) is None
    assert cpu_bf16.small_linear(torch.randn(2, 32), w) is None                 # fp32 activations: F.linear's job
    assert cpu_bf16.small_linear(torch.randn(2, 32).bfloat16(), w.t().contiguous().t()) is None   # not row-major
    x = torch.randn(1, 1, 32).bfloat16()
    assert cpu_bf16.small_linear(x, w).shape == (1, 1, 64)
    linear = torch.nn.Linear(32, 64, bias=True).bfloat16()
    module = cpu_bf16.BF16Linear(linear)
    torch.testing.assert_close(module(x).float(), linear(x).float(), rtol=2 ** -7, atol=1e-2)
    assert module(torch.randn(40, 32).bfloat16()).shape == (40, 64)             # prefill: F.linear


def test_projections_share_one_weight():
    q, k, v = (cpu_bf16.BF16Linear(torch.nn.Linear(32, o, bias=False).bfloat16()) for o in (64, 16, 16))
    before = [m.weight.detach().clone() for m in (q, k, v)]
    group = cpu_bf16.fuse_bf16([q, k, v])
    assert group is not None and group.weight.shape == (96, 32)
    assert all(torch.equal(m.weight, b) and m.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
               for m, b in zip((q, k, v), before))
    x = torch.randn(1, 32).bfloat16()
    assert torch.equal(group.linear(x), torch.cat([q(x), k(x), v(x)], dim=-1))
