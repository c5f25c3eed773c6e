"""bf16 on the CPU: dense linears and resident experts on our kernel (few tokens) or prepacked for
oneDNN (bitwise F.linear's, where our kernel is not built).

Either way a bf16 model decodes to the same bits whether its experts are resident or offloaded
(slot views): the same kernel computes both."""

import pytest
import torch
import torch.nn.functional as F

import offload_moe
from conftest import save, tiny_mixtral
from offload_moe.kernels.cpu_bf16 import BF16Linear, PackedBF16, PackedLinear, bmv_available, packing_available
from offload_moe import Placement

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN prepacking is not F.linear's bits here")


@pytest.mark.parametrize("shape", [(64, 32), (2816 // 8, 1024 // 8)])
@pytest.mark.parametrize("tokens", [1, 2, 7, 64])
def test_packed_product_is_f_linear_bitwise(shape, tokens):
    g = torch.Generator().manual_seed(tokens)
    w = torch.randn(shape, generator=g).to(torch.bfloat16)
    x = torch.randn(tokens, shape[1], generator=g).to(torch.bfloat16)
    assert torch.equal(PackedBF16(w).linear(x), F.linear(x, w))


def test_bf16_model_packs_and_offloaded_equals_resident(tmp_path):
    src = save(tiny_mixtral(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
               tmp_path / "m")
    resident = offload_moe.load(src, device="cpu", dtype=torch.bfloat16)
    form = BF16Linear if bmv_available() else PackedLinear
    swapped = [m for m in resident.transformer.modules() if isinstance(m, form)]
    assert len(swapped) == 3 * 4 + 1  # q, k, v, o per layer and lm_head; routers keep their weight
    w1 = resident.experts.experts[0][0].weights.w1
    assert isinstance(w1, torch.Tensor) if bmv_available() else isinstance(w1, PackedBF16)
    ids = torch.tensor([[1, 17, 42, 5, 66, 23, 9]])
    want = resident.logits(ids)
    for slots in (1, 3):
        offloaded = offload_moe.load(src, Placement(cache_slots=slots, prefetch=1), device="cpu",
                                     dtype=torch.bfloat16)
        assert torch.equal(offloaded.logits(ids), want)
        a = resident.generate(ids[0].tolist(), max_new_tokens=6, temperature=0).token_ids
        assert offloaded.generate(ids[0].tolist(), max_new_tokens=6, temperature=0).token_ids == a
