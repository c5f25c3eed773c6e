"""The Triton kernels (quant/kernels_triton.py) against float64 math, for every width and several
group sizes: on the CPU through Triton's interpreter, on a GPU for real."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload_moe.quant import kernels_triton, quantize

CHECK = Path(__file__).with_name("triton_kernel_check.py")
ROOT = CHECK.parent.parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install 'offload-moe[triton]')")
needs_cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and kernels_triton.HAS_TRITON),
                                       reason="needs a CUDA GPU with triton installed")


@needs_triton
def test_kernels_match_float64_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(CHECK), "cpu"], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0 and "KERNELS OK" in res.stdout, (res.stdout + res.stderr)[-4000:]


@needs_cuda_triton
def test_kernels_match_float64_on_cuda():
    import triton_kernel_check

    assert triton_kernel_check.main("cuda", quick=True) == 0


@needs_cuda_triton
def test_kernel_launches_on_the_tensors_device():
    """Finding #6: a tensor on the last GPU is computed there even when another one is current."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    qw = quantize(torch.randn(64, 256) * 0.05, 4, 64).to(dev)
    x = torch.randn(1, 256, device=dev)
    with torch.cuda.device(0):
        y = kernels_triton.dequant_matmul(x, qw.packed, qw.scales, qw.zeros, 4, 64, 64)
    torch.testing.assert_close(y, x @ qw.dequantize().T, rtol=1e-4, atol=1e-4)


def test_fast_path_needs_power_of_two_groups_and_aligned_words():
    packed = torch.zeros(4, 64, dtype=torch.uint8)
    assert kernels_triton.fast_path(packed, 4, 64) and kernels_triton.fast_path(packed, 3, 32)
    assert not kernels_triton.fast_path(packed, 3, 16)  # 32 codes per 3-word unit
    assert not kernels_triton.fast_path(packed, 4, 40)
    assert not kernels_triton.fast_path(torch.zeros(4, 66, dtype=torch.uint8), 8, 64)
