"""CPU shortcuts in the attention side that must not change results: RMSNorm of bf16 through
torch's fused op (bitwise the fp32 reference), a single bf16 query attended in fp32 (as accurate as
torch's own bf16 kernel, against float64)."""

import torch
import torch.nn.functional as F

from offload_moe.model.attention import RMSNorm, attend


def test_rmsnorm_of_bf16_on_the_cpu_is_bitwise_the_fp32_reference():
    for hidden in (64, 160, 1024):
        norm = RMSNorm(hidden, 1e-6)
        norm.weight.data = torch.randn(hidden).bfloat16()
        x = (torch.randn(2, 5, hidden) * 3).bfloat16()
        h = x.float()
        reference = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        assert torch.equal(norm(x), reference)


def test_one_bf16_query_is_attended_in_fp32_at_least_as_accurately():
    g = torch.Generator().manual_seed(0)
    for cached in (7, 90):
        q, k, v = (torch.randn(1, h, t, 64, generator=g).bfloat16() for h, t in ((8, 1), (2, cached), (2, cached)))
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
        ours = attend(q, k, v, None, enable_gqa=True)
        torchs = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
        assert (ours.double() - exact).abs().max() <= (torchs.double() - exact).abs().max() + 2 ** -8
