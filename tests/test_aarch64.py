"""The aarch64 build of our C kernels against the same float64 oracles as on x86 (test_cpu_qmv.py,
test_cpu_ggml.py, test_cpu_bmv.py), run under qemu-user: each aarch64 variant (NEON with the
dot-product extension, and the portable baseline) is cross-compiled from the package's sources with
the flags the package ships (kernel_build.py), linked into a small driver (kernel_driver.c) that
reads the inputs this test writes and writes the outputs back; no aarch64 Python is needed.

Needs Debian's gcc-aarch64-linux-gnu and qemu-user; skipped with a reason without them. The cross
build (about a minute) is cached under the pytest cache by a hash of the sources, so a rerun with
unchanged kernels only runs the driver.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from offload_moe.kernels import cpu_qmv, ggml, kernel_build, quantize
from offload_moe.kernels.cpu_qmv import to_qmv
from kernel_variants import PATHS
from test_cpu_ggml import TYPES, float64_weight, weight
from test_cpu_qmv import float64_linear

CC, QEMU, SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu"
pytestmark = pytest.mark.skipif(shutil.which(CC) is None or shutil.which(QEMU) is None,
                                reason=f"needs {CC} and {QEMU} (apt-get install gcc-aarch64-linux-gnu qemu-user)")
ARM = kernel_build.variants_for("aarch64")
DRIVER = Path(__file__).with_name("kernel_driver.c")


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module", params=ARM)
def driver(request, pytestconfig) -> Path:
    """The driver linked with one aarch64 variant's objects, built once per source hash."""
    variant = request.param
    key = kernel_build.source_hash(kernel_build.sources() + kernel_build.headers() + [DRIVER])
    cache = Path(pytestconfig.cache.mkdir("aarch64-kernels")) / f"{variant}-{key}"
    program = cache / "kernel_driver"
    if not program.exists():
        objects = cache / "objects"
        kernel_build.compile_library(objects, kernel_build.VARIANTS[variant][1], variant, cc=CC, link=False)
        flags = kernel_build.VARIANTS[variant][1]
        done = subprocess.run([CC, "-O2", "-fopenmp", *flags, "-static", f"-I{kernel_build.HERE}", str(DRIVER),
                               *map(str, sorted(objects.glob("*.o"))), "-o", str(program) + ".tmp", "-lm"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        Path(str(program) + ".tmp").rename(program)
    info = run(program, "info").split()
    assert info[0] == variant
    assert [int(v) for v in info[1:]] == [PATHS[variant][k] for k in ("qmv", "ggml", "bmv")]
    return program


def run(program: Path, call: str, scalars: list[int] | None = None, arrays: list[torch.Tensor] = (),
        out: tuple[tuple[int, ...], torch.dtype] | None = None, tmp: Path | None = None) -> torch.Tensor | str:
    """Call `call` in the driver under qemu: the scalars and arrays in, the output array back."""
    command = [QEMU, "-L", SYSROOT, str(program), call]
    if scalars is not None:
        blobs = [struct.pack(f"<{len(scalars)}q", *scalars)] + [a.contiguous().view(torch.uint8).numpy().tobytes()
                                                                for a in arrays]
        (tmp / "in").write_bytes(struct.pack("<q", len(blobs)) + b"".join(struct.pack("<q", len(b)) + b for b in blobs))
        command += [str(tmp / "in"), str(tmp / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr)
    if scalars is None:
        return done.stdout
    assert done.stdout.strip() == "0", f"{call} returned {done.stdout.strip()}"
    shape, dtype = out
    return torch.frombuffer(bytearray((tmp / "out").read_bytes()), dtype=dtype).view(shape)


CODE = {torch.float32: 0, torch.bfloat16: 1}


@pytest.mark.parametrize("bits, group, inputs", [(4, 32, 160), (4, 64, 576), (4, 128, 512), (8, 32, 352),
                                                 (8, 64, 768), (2, 64, 512), (3, 32, 160)])
def test_qmv_matches_float64(driver, tmp_path, bits, group, inputs):
    g = torch.Generator().manual_seed(bits * 1000 + group + inputs)
    qw = quantize(torch.randn(72, inputs, generator=g) * 0.02, bits, group)
    m = to_qmv(qw)
    for tokens, dtype, call in ((1, torch.float32, "qmv_p"), (3, torch.bfloat16, "qmv"), (6, torch.float32, "qmv")):
        x = torch.randn(tokens, inputs, generator=g).to(dtype)
        y = run(driver, call, [tokens, 72, inputs, group, m.kernel_bits, CODE[dtype], 2],
                [x, m.codes, m.scales, m.zeros], ((tokens, 72), dtype), tmp_path)
        assert rel_error(y, float64_linear(x, qw)) < cpu_qmv.TOLERANCE, (tokens, dtype, call)


def test_the_fused_qmv_expert_matches_float64(driver, tmp_path):
    g = torch.Generator().manual_seed(4)
    w1, w3 = (quantize(torch.randn(192, 128, generator=g) * 0.05, 4, 64) for _ in range(2))
    w2 = quantize(torch.randn(128, 192, generator=g) * 0.05, 4, 32)
    m1, m3, m2 = to_qmv(w1), to_qmv(w3), to_qmv(w2)
    x = torch.randn(3, 128, generator=g)
    ref = float64_linear(torch.nn.functional.silu(float64_linear(x, w1)) * float64_linear(x, w3), w2)
    y = run(driver, "qmv_swiglu_p", [3, 128, 192, 64, 4, 32, 4, 0, 2],
            [x, m1.codes, m1.scales, m1.zeros, m3.codes, m3.scales, m3.zeros, m2.codes, m2.scales, m2.zeros],
            ((3, 128), torch.float32), tmp_path)
    assert rel_error(y, ref) < 2 * cpu_qmv.TOLERANCE


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_every_ggml_type_matches_float64(driver, tmp_path, ggml_type):
    w = weight(ggml_type, 37, 512, seed=int(ggml_type))
    ref_w = float64_weight(w)
    g = torch.Generator().manual_seed(int(ggml_type))
    for tokens, dtype, call in ((1, torch.float32, "ggml_mv_p"), (3, torch.bfloat16, "ggml_mv"),
                                (64, torch.float32, "ggml_mv")):
        x = torch.randn(tokens, 512, generator=g).to(dtype)
        y = run(driver, call, [tokens, 37, 512, int(ggml_type), CODE[dtype], 2], [x, w.data], ((tokens, 37), dtype),
                tmp_path)
        assert rel_error(y, x.double() @ ref_w.t()) < ggml.TOLERANCE, (tokens, dtype, call)


@pytest.mark.parametrize("shape", [(64, 32), (96, 1000), (37, 100)])
def test_bf16_product_matches_float64(driver, tmp_path, shape):
    g = torch.Generator().manual_seed(shape[1])
    w = torch.randn(shape, generator=g).bfloat16()
    x = torch.randn(3, shape[1], generator=g).bfloat16()
    ref = x.double() @ w.double().t()
    y = run(driver, "bmv", [3, *shape, 0, 2], [x, w], ((3, shape[0]), torch.float32), tmp_path)
    assert rel_error(y, ref) < 1e-5
