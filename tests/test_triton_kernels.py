"""The Triton kernels (quant/kernels_triton.py) against float64 math, for every width and several
group sizes: on the CPU through Triton's interpreter, on a GPU for real."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload_moe.kernels import kernels_triton, quantize

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
        y = kernels_triton.dequant_matmul(x, qw)
    torch.testing.assert_close(y, x @ qw.dequantize().T, rtol=1e-4, atol=1e-4)


def test_fast_path_needs_power_of_two_groups_and_aligned_words():
    packed = torch.zeros(4, 64, dtype=torch.uint8)
    assert kernels_triton.fast_path(packed, 4, 64) and kernels_triton.fast_path(packed, 3, 32)
    assert not kernels_triton.fast_path(packed, 3, 16)  # 32 codes per 3-word unit
    assert not kernels_triton.fast_path(packed, 4, 40)
    assert not kernels_triton.fast_path(torch.zeros(4, 66, dtype=torch.uint8), 8, 64)


COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from offload_moe.kernels import kernels_triton as kt

TYPES = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", y_ptr="*bf16", packed_ptr="*u8",
             scales_ptr="*fp16", zeros_ptr="*fp16", B="i32", N="i32", K="i32", WPR="i32", GPR="i32", P="i32",
             G="i32", stride_xb="i32", stride_yb="i32")

def build(fn, consts, arch):
    sig = {n: "constexpr" if n in consts else TYPES[n] for n in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                   options=dict(num_warps=4, num_stages=3))

try:  # is there a CUDA backend with ptxas at all?
    build(kt._generic_kernel, dict(BITS=4, GROUP=64, BLOCK_N=32, BLOCK_K=128), 90)
except Exception as e:
    print("NO BACKEND", type(e).__name__, e)
    sys.exit(0)
for arch in (90, 86):  # the H200 and a consumer Ampere card
    for bits in (3, 4):
        base = dict(BITS=bits, GROUP=64, CU=kt.CODES_PER_UNIT[bits], WU=kt.WORDS_PER_UNIT[bits])
        build(kt._qgemv_kernel, dict(base, BLOCK_B=4 if bits == 3 else 1, BLOCK_N=16, BLOCK_K=256,
                                             EVEN_K=arch == 90), arch)
        if arch == 90:
            build(kt._qgemm_kernel, dict(base, BLOCK_B=16, BLOCK_N=32, BLOCK_K=512, EVEN_K=True,
                                             FP32=False), arch)
print("COMPILED")
"""


@needs_triton
def test_kernels_compile_for_gpus_without_one(tmp_path):
    """Triton compiles for a GPU target without a GPU (ptxas ships with it): the real code generator,
    not the interpreter, accepts the kernels' shapes, constexprs and types."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path)}  # really compile
    res = subprocess.run([sys.executable, "-c", COMPILE], env=env,
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    if "NO BACKEND" in res.stdout:
        pytest.skip(f"this triton cannot compile for CUDA here: {res.stdout.strip()[:200]}")
    assert res.returncode == 0 and "COMPILED" in res.stdout, (res.stdout + res.stderr)[-4000:]
