"""NF4 experts: the format against float64 math, the engine against all-resident, bitsandbytes on CUDA."""

import pytest
import torch

import offload_moe
from offload_moe import OffloadMoeError
from offload_moe.kernels.nf4 import BLOCK, NF4_LEVELS, NF4Weight
from offload_moe import Placement

PROMPT = [1, 17, 42, 5, 66, 23, 9]


def test_nf4_rounds_each_weight_to_the_nearest_level_of_its_block():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = NF4Weight.quantize(w)
    assert q.packed.numel() == w.numel() // 2 and q.absmax.numel() == w.numel() // BLOCK
    assert q.nbytes == w.numel() // 2 + 4 * w.numel() // BLOCK
    blocks = w.reshape(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    nearest = levels[((blocks / absmax)[..., None] - levels).abs().argmin(-1)] * absmax  # float64 oracle
    assert torch.allclose(q.dequantize(torch.float64), nearest.reshape(w.shape), rtol=0, atol=1e-6)


def test_nf4_packing_is_high_nibble_first_like_bitsandbytes():
    w = torch.zeros(1, BLOCK)
    w[0, 0], w[0, 1] = -1.0, 1.0  # codes 0 and 15
    assert NF4Weight.quantize(w).packed[0].item() == 0x0F


@pytest.mark.parametrize("slots", [None, 2])
def test_nf4_experts_offloaded_equal_resident(tiny_checkpoint, slots):
    resident = offload_moe.load(tiny_checkpoint[0], Placement(nf4_experts=True, cpu_experts="none"), device="cpu")
    model = offload_moe.load(tiny_checkpoint[0], Placement(nf4_experts=True, cache_slots=slots or "all"),
                             device="cpu")
    expected = resident.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert model.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == expected
    full = offload_moe.load(tiny_checkpoint[0], device="cpu")
    ids = torch.tensor([PROMPT])
    rel = (model.logits(ids) - full.logits(ids)).norm() / full.logits(ids).norm()
    assert 0 < rel < 0.25  # 4-bit experts: close to the float model, not equal


def test_nf4_on_a_quantized_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path):
    dst = offload_moe.quantize(tiny_checkpoint[0], tmp_path / "q", experts="int8", attention="fp32",
                               embeddings="fp32", group_size=16, method="rtn")
    with pytest.raises(OffloadMoeError, match="already quantized"):
        offload_moe.load(dst, Placement(nf4_experts=True), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with bitsandbytes")
def test_bitsandbytes_matmul_equals_the_torch_path():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    w = torch.randn(256, 128, device="cuda", dtype=torch.float16)
    q = NF4Weight.quantize(w)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4")
    assert torch.equal(packed.flatten(), q.packed) and torch.allclose(state.absmax, q.absmax)
    x = torch.randn(1, 128, device="cuda", dtype=torch.float16)
    assert torch.allclose(q.linear(x), torch.nn.functional.linear(x, q.dequantize(torch.float16)), atol=1e-2)
