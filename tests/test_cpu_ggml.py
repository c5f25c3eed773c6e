"""Our C kernel for ggml's block layouts (quant/ggml_mv.c) against float64 math on the gguf package's
own dequantization of the same bytes, on every instruction path this machine can run; the weight
form around it (quant/ggml.py): the fused expert, the q/k/v group, the row gather, thread counts
and the fallback without the library.

The kernel computes from int8 activations (one scale per 32 inputs for the legacy types and MXFP4,
per 256 for the K types), so it agrees with `x @ dequantize(bytes).T` in float64 within
`ggml.TOLERANCE` (relative Frobenius error; measured up to ~1.7% on these random blocks, bf16
outputs included). Types the gguf package cannot quantize (the K types) get random bytes with small
positive fp16 scales, so every block is valid and every value finite.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import offload_moe
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

from offload_moe.kernels import ggml, native
from offload_moe.kernels.ggml import GGMLGroup, GGMLWeight
from kernel_variants import VARIANTS, open_variant

pytestmark = pytest.mark.skipif(native.load("ggml") is None, reason=f"the ggml kernel is not built here: "
                                                                    f"{native.status('ggml')}")

TYPES = list(ggml.BLOCK_TYPES) + list(ggml.FLOAT_TYPES)
QUANTIZABLE = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4, T.F32, T.F16, T.BF16}
# where a K block keeps its fp16 scales: (byte offset, low, high); small so values stay finite
K_SCALES = {T.Q2_K: [(80, 1e-3, 2e-3), (82, 1e-3, 2e-3)], T.Q3_K: [(108, 1e-3, 2e-3)],
            T.Q4_K: [(0, 1e-3, 2e-3), (2, 1e-3, 2e-3)], T.Q5_K: [(0, 1e-3, 2e-3), (2, 1e-3, 2e-3)],
            T.Q6_K: [(208, 1e-4, 2e-4)]}


def random_matrix(ggml_type: T, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid random bytes of a [rows, cols] matrix of `ggml_type`: uint8 [rows, row bytes]."""
    rng = np.random.default_rng(seed)
    if ggml_type in QUANTIZABLE:
        w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
        return np.ascontiguousarray(quants.quantize(w, ggml_type).view(np.uint8))
    bs, ts = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, size=(rows, cols // bs, ts), dtype=np.uint8)
    for offset, lo, hi in K_SCALES[ggml_type]:
        scale = rng.uniform(lo, hi, size=(rows, cols // bs)).astype(np.float16)
        raw[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(rows, cols // bs, 2)
    return raw.reshape(rows, -1)


def weight(ggml_type: T, rows: int, cols: int, seed: int = 0) -> GGMLWeight:
    return GGMLWeight(torch.from_numpy(random_matrix(ggml_type, rows, cols, seed)), ggml_type, (rows, cols))


def float64_weight(w: GGMLWeight) -> torch.Tensor:
    """The gguf package's dequantization of the same bytes, in float64: [O, I]."""
    return torch.from_numpy(quants.dequantize(w.data.numpy(), w.ggml_type).astype(np.float64)).view(w.shape)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module", params=VARIANTS)
def lib(request):
    """The package's library of one instruction-set variant (skipped where this CPU cannot run it)."""
    return open_variant(request.param, "ggml")


def call(lib, w: GGMLWeight, x: torch.Tensor, threads: int = 2) -> torch.Tensor:
    code = {torch.float32: 0, torch.bfloat16: 1}[x.dtype]
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    assert lib.ggml_mv(x.data_ptr(), code, y.data_ptr(), code, x.shape[0], *w.shape, w.data.data_ptr(),
                       int(w.ggml_type), threads) == 0
    return y


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_every_type_and_path_matches_float64(lib, ggml_type):
    """37 rows: groups of 8 and a rest; 512 inputs: two K super-blocks, sixteen legacy blocks."""
    w = weight(ggml_type, 37, 512, seed=int(ggml_type))
    ref_w = float64_weight(w)
    g = torch.Generator().manual_seed(int(ggml_type))
    for tokens in (1, 2, 3, 7, 64, 300):
        x = torch.randn(tokens, 512, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            y = call(lib, w, xd)
            assert y.dtype == dtype and rel_error(y, xd.double() @ ref_w.t()) < ggml.TOLERANCE, (tokens, dtype)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_a_token_gets_the_same_bits_alone_and_in_a_prefill(lib, ggml_type):
    """One formula for any number of tokens (the eight-row kernels too, short last group included):
    a decode step computes what a prefill computes for that token, bit for bit."""
    w = weight(ggml_type, 37, 512, seed=3)
    x = torch.randn(11, 512, generator=torch.Generator().manual_seed(4))        # a tile of 8 and a rest
    together = call(lib, w, x)
    for t in range(11):
        assert torch.equal(call(lib, w, x[t:t + 1]), together[t:t + 1]), t


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_threads_change_nothing_and_paths_agree(lib, ggml_type):
    """Each output is one thread's sum in a fixed order: 1 and 2 threads give the same bits; the
    paths round alike up to fp32 sum order."""
    w = weight(ggml_type, 64, 768, seed=1)
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(2))
    for tokens in (1, 5):
        one, two = call(lib, w, x[:tokens], threads=1), call(lib, w, x[:tokens], threads=2)
        assert torch.equal(one, two)
        default = call(native.load("ggml"), w, x[:tokens])
        assert rel_error(one, default.double()) < 1e-3


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_the_row_gather_is_the_gguf_dequantization(ggml_type):
    w = weight(ggml_type, 50, 512, seed=3)
    ids = torch.tensor([[7, 0], [49, 7]])
    ref = float64_weight(w)[ids.view(-1)].view(2, 2, 512)
    rows = w.rows(ids)
    assert rows.shape == (2, 2, 512) and rows.dtype == torch.float32
    assert torch.allclose(rows.double(), ref, rtol=1e-6, atol=1e-9)
    assert torch.equal(w.rows(ids, torch.bfloat16), rows.to(torch.bfloat16))
    assert torch.equal(w.dequantize_rows(3, 9), w.rows(torch.arange(3, 9)))
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        w.rows(torch.tensor([50]))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_linear_keeps_leading_dimensions_and_dtypes(ggml_type):
    w = weight(ggml_type, 24, 256, seed=4)
    assert w.in_kernel
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 3, 256).to(dtype)
        y = w.linear(x)
        assert y.shape == (2, 3, 24) and y.dtype == dtype
        assert rel_error(y.view(6, 24), x.view(6, 256).double() @ float64_weight(w).t()) < ggml.TOLERANCE
    strided = torch.randn(256, 4).t()                                # not contiguous
    assert torch.equal(w.linear(strided), w.linear(strided.contiguous()))


@pytest.mark.parametrize("gate_type, down_type", [(T.Q4_0, T.Q4_0), (T.Q8_0, T.Q8_0), (T.Q4_K, T.Q6_K),
                                                  (T.Q2_K, T.Q3_K), (T.Q5_K, T.Q5_1), (T.MXFP4, T.MXFP4),
                                                  (T.F16, T.BF16)], ids=lambda t: t.name)
def test_the_fused_expert_matches_its_three_products(gate_type, down_type):
    """One call: gate and up from one activation quantization, silu * up in fp32, then down: the same
    arithmetic as three `linear`s with fp32 activations, so they agree to fp32 rounding of silu."""
    gate, up = weight(gate_type, 512, 256, seed=5), weight(gate_type, 512, 256, seed=6)
    down = weight(down_type, 256, 512, seed=7)
    expert = gate.bind_swiglu(up, down)
    assert expert is not None
    g = torch.Generator().manual_seed(8)
    for tokens in (1, 3, 7):
        x = torch.randn(tokens, 256, generator=g)
        y = expert(x)
        three = down.linear(torch.nn.functional.silu(gate.linear(x)) * up.linear(x))
        assert y.shape == (tokens, 256) and rel_error(y, three.double()) < 1e-3
        ref_h = torch.nn.functional.silu(x.double() @ float64_weight(gate).t()) * (x.double() @ float64_weight(up).t())
        ref = ref_h @ float64_weight(down).t()
        assert rel_error(y, ref) < 2 * ggml.TOLERANCE                          # two int8-activation products
        yb = expert(x.to(torch.bfloat16))
        assert yb.dtype == torch.bfloat16 and rel_error(yb, ref) < 2 * ggml.TOLERANCE
    assert gate.swiglu(x, up, down) is not None and torch.equal(gate.swiglu(x, up, down), expert(x))
    assert gate.bind_swiglu(down, up) is None                                  # shapes that do not chain


def test_the_fused_expert_steps_aside_where_it_should():
    gate, up, down = weight(T.Q4_0, 64, 128, 1), weight(T.Q4_0, 64, 128, 2), weight(T.Q4_0, 128, 64, 3)
    assert gate.bind_swiglu(weight(T.Q8_0, 64, 128, 2), down) is None          # gate and up of two types
    expert = gate.bind_swiglu(up, down)
    assert expert(torch.randn(2, 128, dtype=torch.float16)) is None
    f16 = [weight(T.F16, 64, 128, 1), weight(T.F16, 64, 128, 2), weight(T.F16, 128, 64, 3)]
    assert f16[0].bind_swiglu(f16[1], f16[2])(torch.randn(ggml.FLOAT_KERNEL_TOKENS, 128)) is None  # dense instead


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_K, T.Q6_K, T.BF16], ids=lambda t: t.name)
def test_a_group_of_projections_equals_its_matrices_bitwise(ggml_type):
    mats = [weight(ggml_type, o, 512, seed=o) for o in (128, 32, 40)]
    group = GGMLGroup(mats)
    for tokens in (1, 5):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, tokens, 512).to(dtype)
            y = group.linear(x)
            assert y.shape == (1, tokens, 200)
            assert torch.equal(y, torch.cat([m.linear(x) for m in mats], dim=-1))
    with pytest.raises(ValueError):
        GGMLGroup([mats[0], weight(T.Q8_0, 32, 512)])


def test_a_zero_activation_block_and_large_values():
    for ggml_type in (T.Q4_0, T.Q4_K):
        w = weight(ggml_type, 16, 512, seed=9)
        x = torch.randn(2, 512) * 1e4
        x[0, :256] = 0                                                         # blocks whose scale is 0
        assert rel_error(w.linear(x), x.double() @ float64_weight(w).t()) < ggml.TOLERANCE


def run_python(code: str, **env) -> str:
    # the offload_moe this test imported (the installed one in CI, the checkout in an editable install),
    # from a neutral folder so that `-c`'s current directory does not put the source tree first
    package_root = Path(offload_moe.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir(), env={**os.environ, "PYTHONPATH": str(package_root), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_without_the_library_the_reference_still_computes():
    probe = f"""
import numpy as np, torch, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_cpu_ggml import weight, float64_weight, rel_error
from gguf import GGMLQuantizationType as T
from offload_moe.kernels import native
for t in (T.Q4_0, T.Q6_K, T.F16):
    w = weight(t, 24, 256, seed=1)
    x = torch.randn(3, 256)
    assert not w.in_kernel and w.bind_swiglu(w, w) is None
    assert rel_error(w.linear(x), x.double() @ float64_weight(w).t()) < 1e-5    # fp32 dense, no int8 rounding
    assert torch.allclose(w.rows(torch.tensor([2, 5])).double(), float64_weight(w)[[2, 5]])
print(native.status("ggml"))
"""
    assert run_python(probe, OFFLOAD_MOE_NATIVE="0") == "off (OFFLOAD_MOE_NATIVE=0)"


@pytest.mark.parametrize("gate_type, down_type", [(T.Q4_0, T.Q4_0), (T.Q4_K, T.Q6_K)], ids=lambda t: t.name)
def test_a_decode_steps_experts_in_one_call_equal_each_experts_call(gate_type, down_type):
    mats = [(weight(gate_type, 512, 256, seed=10 + j), weight(gate_type, 512, 256, seed=20 + j),
             weight(down_type, 256, 512, seed=30 + j)) for j in range(5)]                  # kept alive here
    experts = [gate.bind_swiglu(up, down) for gate, up, down in mats]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 256, generator=torch.Generator().manual_seed(11)).to(dtype)
        y = ggml.experts_one_token(x, experts)
        assert y.shape == (5, 256) and y.dtype == dtype
        assert torch.equal(y, torch.cat([f(x) for f in experts]))
    square = [weight(gate_type, 256, 256, seed=1), weight(gate_type, 256, 256, seed=2), weight(down_type, 256, 256, seed=3)]
    other = square[0].bind_swiglu(*square[1:])
    assert ggml.experts_one_token(x, experts + [other]) is None                # experts of another shape
    assert ggml.experts_one_token(x, experts + [None]) is None                 # one without the kernel
    assert ggml.experts_one_token(torch.randn(2, 256), experts) is None        # a prefill
