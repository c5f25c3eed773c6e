"""Our C kernel for quantized products (quant/qmv.c) against float64 math, on every instruction path
this machine can run, and its build: cached, atomic, shared with torch's OpenMP runtime, off when
asked, nothing left behind when the compiler fails.

The oracle is `x @ ((code - zero) * scale).T` in float64 from the stored codes, scales and zeros;
the kernel computes from int8 activations (one scale per 64 inputs), so they agree within
`cpu_qmv.TOLERANCE` (relative Frobenius error). The three paths are also checked against each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest
import torch

import offload_moe

from offload_moe.kernels import cpu_qmv, native, quantize
from offload_moe.kernels.cpu_qmv import QmvMatrix, to_qmv
from kernel_variants import VARIANTS, open_variant

if native.load() is None:
    pytest.skip(f"the qmv kernel is not built here: {native.status()}", allow_module_level=True)

@pytest.fixture(scope="module", params=VARIANTS)
def lib(request):
    """The package's library of one instruction-set variant (skipped where this CPU cannot run it)."""
    return open_variant(request.param, "qmv")


def float64_linear(x: torch.Tensor, qw) -> torch.Tensor:
    O, I = qw.shape
    codes = qw.codes().double().view(O, -1, qw.group_size)
    w = (codes - qw.zeros.double()[..., None]) * qw.scales.double()[..., None]
    return x.double() @ w.view(O, I).t()


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def call(lib, m: QmvMatrix, x: torch.Tensor, threads: int = 2) -> torch.Tensor:
    code = {torch.float32: 0, torch.bfloat16: 1}[x.dtype]
    y = torch.empty(x.shape[0], m.shape[0], dtype=x.dtype)
    rc = lib.qmv(x.data_ptr(), code, y.data_ptr(), code, x.shape[0], m.shape[0], m.shape[1], m.codes.data_ptr(),
                 m.scales.data_ptr(), m.zeros.data_ptr(), m.group_size, m.kernel_bits, threads)
    assert rc == 0
    return y


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group, inputs", [(g, i) for g in (32, 64, 128, 256) for i in (512, 768, 576, 160, 352)
                                           if i % g == 0])
def test_every_path_matches_float64(lib, bits, group, inputs):  # 576 = 4 x 128 + 64; 160 = 128 + 32; 352 = 2 x 128 + 64 + 32
    g = torch.Generator().manual_seed(bits * 1000 + group + inputs)
    qw = quantize(torch.randn(72, inputs, generator=g) * 0.02, bits, group)   # 72 rows: any count
    m = to_qmv(qw)
    for tokens in (1, 3, 4, 6):                                               # tiles of 4 tokens and their rest
        x = torch.randn(tokens, inputs, generator=g)
        ref = float64_linear(x, qw)
        for dtype in (torch.float32, torch.bfloat16):
            y = call(lib, m, x.to(dtype))
            assert y.dtype == dtype and rel_error(y, ref) < cpu_qmv.TOLERANCE, (tokens, dtype)


def test_paths_agree_and_threads_change_nothing(lib):
    """Each row is one thread's work, so 1 and 2 threads give the same bits; and every path
    computes the same sums up to fp32 ordering."""
    qw = quantize(torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02, 4, 64)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(1))
    m = to_qmv(qw)
    one, two = call(lib, m, x, threads=1), call(lib, m, x, threads=2)
    assert torch.equal(one, two)
    default = call(native.load(), m, x)
    assert torch.allclose(one, default, rtol=1e-5, atol=1e-6 * default.abs().max().item())


def test_an_all_zero_activation_block_and_large_values():
    qw = quantize(torch.randn(64, 256, generator=torch.Generator().manual_seed(2)), 8, 32)
    x = torch.randn(1, 256) * 1e4
    x[0, :64] = 0                                                # a block whose scale is 0
    assert rel_error(to_qmv(qw).linear(x), float64_linear(x, qw)) < cpu_qmv.TOLERANCE


def test_the_form_shares_the_stored_bytes_and_keeps_leading_dimensions():
    for bits in (4, 8):
        qw = quantize(torch.randn(64, 128) * 0.02, bits, 64)
        m = to_qmv(qw)
        assert m.codes.data_ptr() == qw.packed.data_ptr() and not m.owns_bytes   # no second copy
    three = to_qmv(quantize(torch.randn(64, 128) * 0.02, 3, 64))
    assert three.owns_bytes and three.codes.shape == (64, 64)                     # repacked to 4 bits
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    y = m.linear(x)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    assert rel_error(y.view(-1, 64), float64_linear(x.view(-1, 128), qw)) < cpu_qmv.TOLERANCE


@pytest.mark.parametrize("bits", [4, 8])
def test_long_prefill_dequantizes_in_row_chunks(bits, monkeypatch):
    qw = quantize(torch.randn(300, 256, generator=torch.Generator().manual_seed(bits)) * 0.02, bits, 64)
    m = to_qmv(qw)
    rows = []
    original = QmvMatrix.dequantize_rows
    monkeypatch.setattr(QmvMatrix, "dequantize_rows", lambda self, r0, r1, dtype=torch.bfloat16:
                        rows.append((r0, r1)) or original(self, r0, r1, dtype))
    x = torch.randn(m.dense_from + 1, 256)
    assert rel_error(m.linear(x), float64_linear(x, qw)) < 1e-5                    # fp32 dense: no int8 rounding
    assert rows == [(0, 256), (256, 300)]
    rows.clear()
    m.linear(x[:3])
    assert rows == []                                                             # decode: from the packed bytes


def test_the_jit_build_is_cached_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    """The builder behind OFFLOAD_MOE_ISA=native and a stale editable install."""
    first = native.build(native.SOURCE, directory=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert native.build(native.SOURCE, directory=tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    bad = tmp_path / "bad.c"
    bad.write_text("int qmv_path(void) { return syntax error; }\n")
    with pytest.raises(RuntimeError, match="could not build bad.c"):
        native.build(source=bad, directory=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, "bad.c"])
    stale = tmp_path / ".kernels-killed"                                # a build killed outright
    stale.mkdir()
    os.utime(stale, (1, 1))
    first.unlink()
    assert native.build(native.SOURCE, directory=tmp_path) == first and not stale.exists()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no C compiler"):
        native.build(native.SOURCE, directory=tmp_path / "other")


def test_a_changed_shared_header_is_a_new_build(tmp_path, monkeypatch):
    from offload_moe.kernels import kernel_build

    include = tmp_path / "include"
    include.mkdir()
    for name in ("qmv.c", "kernel_common.h", "kernel_args.h"):
        (include / name).write_text((native.INCLUDE / name).read_text())
    monkeypatch.setattr(kernel_build, "SOURCE_DIRS", (include,))
    first = native.build(include / "qmv.c", directory=tmp_path / "out")
    header = include / "kernel_common.h"
    header.write_text(header.read_text() + "\n/* changed */\n")
    second = native.build(include / "qmv.c", directory=tmp_path / "out")
    assert second != first and first.exists() and second.exists()


def run_python(code: str, **env) -> str:
    # the offload_moe this test imported (the installed one in CI, the checkout in an editable install),
    # from a neutral folder so that `-c`'s current directory does not put the source tree first
    package_root = Path(offload_moe.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir(), env={**os.environ, "PYTHONPATH": str(package_root), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_off_when_asked_or_without_a_library_falls_back_to_torch_and_no_compiler_is_needed(tmp_path):
    probe = ("import torch; from offload_moe.kernels import quantize, native; from offload_moe.kernels.cpu_forms import "
             "to_cpu_kernel; print(type(to_cpu_kernel(quantize(torch.randn(64, 128), 4, 64))).__name__, native.status())")
    assert run_python(probe, OFFLOAD_MOE_NATIVE="0").startswith("Int4Planes off")
    # the package's libraries need no compiler ...
    assert run_python(probe, CC="/nonexistent/cc").startswith("QmvMatrix ")
    # ... a -march=native build does: without one, torch's kernel, and the reason
    out = run_python(probe, OFFLOAD_MOE_ISA="native", CC="/nonexistent/cc", XDG_CACHE_HOME=str(tmp_path))
    assert out.startswith("Int4Planes unavailable: no C compiler")
    assert not any(tmp_path.rglob("*.so"))


def test_one_openmp_runtime_in_the_process_and_its_thread_count_is_ours():
    """Our libraries carry no OpenMP runtime: their parallel regions run in torch's, so the process
    maps one, and torch.set_num_threads sizes our teams as it sizes torch's."""
    out = run_python("""
import json, re, torch
from offload_moe.kernels import native
lib = native.load()
teams = []
for n in (1, 3):
    torch.set_num_threads(n)
    teams.append(lib.kernels_team(0))        # the runtime's default team: torch's setting
teams.append(lib.kernels_team(2))            # what our kernels ask for (threads=torch.get_num_threads())
maps = sorted({l.split()[-1] for l in open('/proc/self/maps') if re.search(r'/lib(gomp|iomp5|omp)[-.][^/]*$', l)})
print(json.dumps([teams, maps]))
""")
    teams, runtimes = json.loads(out)
    assert len(runtimes) == 1 and "torch" in runtimes[0], runtimes
    assert teams == [1, 3, 2]


@pytest.mark.parametrize("bits", [4, 8])
def test_the_fused_expert_matches_float64_and_steps_aside_for_long_prefill(bits):
    from offload_moe.model.expert_interface import ExpertWeights, expert_forward

    g = torch.Generator().manual_seed(bits)
    w1, w3 = (quantize(torch.randn(192, 128, generator=g) * 0.05, bits, 64) for _ in range(2))
    w2 = quantize(torch.randn(128, 192, generator=g) * 0.05, bits, 32)
    fused = ExpertWeights(to_qmv(w1), to_qmv(w3), to_qmv(w2))

    def float64_expert(x):
        gate, up = float64_linear(x, w1), float64_linear(x, w3)
        return float64_linear(torch.nn.functional.silu(gate) * up, w2)

    for tokens in (1, 3, 6):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, 128, generator=g).to(dtype)
            y = fused.w1.swiglu(x, fused.w3, fused.w2)
            assert y.dtype == dtype and y.shape == (tokens, 128)
            assert rel_error(y, float64_expert(x)) < 2 * cpu_qmv.TOLERANCE     # two int8-activation products
            assert torch.equal(expert_forward(x, fused), y)                   # what the engine runs
    long = torch.randn(fused.w1.dense_from, 128)
    assert fused.w1.swiglu(long, fused.w3, fused.w2) is None                 # dense on dequantized rows instead
    assert rel_error(expert_forward(long, fused), float64_expert(long)) < 1e-3


def test_a_group_of_projections_equals_its_matrices_bitwise():
    from offload_moe.kernels.cpu_qmv import QmvGroup

    g = torch.Generator().manual_seed(5)
    mats = [to_qmv(quantize(torch.randn(o, 256, generator=g) * 0.02, 4, 64)) for o in (128, 32, 32)]
    group = QmvGroup(mats)
    for tokens in (1, 5):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, tokens, 256, generator=g).to(dtype)
            y = group.linear(x)
            assert y.shape == (1, tokens, 192)
            assert torch.equal(y, torch.cat([m.linear(x) for m in mats], dim=-1))
    assert group.linear(torch.randn(group.dense_from, 256)) is None        # long prefill: each on its own
    with pytest.raises(ValueError):
        QmvGroup([mats[0], to_qmv(quantize(torch.randn(32, 256) * 0.02, 8, 64))])


def test_the_model_says_which_cpu_kernel_runs(tmp_path):
    import offload_moe
    from conftest import save, tiny_mixtral
    from offload_moe.tools.convert import quantize as convert

    src = save(tiny_mixtral(hidden_size=64, intermediate_size=128), tmp_path / "src")
    convert(src, tmp_path / "int4", experts="int4", attention="int4", group_size=32, method="rtn", device="cpu")
    quantized = offload_moe.load(tmp_path / "int4", device="cpu")
    assert quantized.settings.cpu_kernel == f"qmv ({native.status()})"
    assert quantized.settings.as_dict()["cpu_kernel"] == quantized.settings.cpu_kernel
    assert offload_moe.load(src, device="cpu").settings.cpu_kernel is None          # nothing quantized

