"""Packaging: an sdist of this tree, a wheel built from it with `pip wheel`, installed into a fresh
virtual environment, runs the demo with the native kernels on a machine without a C compiler
(`CC=false`: any attempt to compile fails), on this CPU's best variant and with the AVX2 variant
forced. Slow (the wheel compiles every variant: a minute or more of compiler time).

The fresh environment gets its dependencies (torch, numpy...) from the running interpreter's
site-packages through a .pth line (a plain path: the editable install there is not activated), so
the package it imports is the wheel's, which the test checks."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from offload_moe.kernels import kernel_build, native

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(kernel_build.compiler() is None, reason="building the wheel needs a C compiler")]
ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys, torch, offload_moe
from offload_moe.kernels import native
m = offload_moe.load(device="cpu", dtype=torch.bfloat16)           # the bundled demo, bf16: our bf16 kernel
g = m.generate([1, 2, 3], max_new_tokens=6, temperature=0, ignore_eos=True)
lib = native.load()
print(json.dumps({"package": offload_moe.__file__, "variant": lib and lib.kernels_variant().decode(),
                  "qmv": native.status(), "decode": native.status("decode"), "cpu_kernel": m.settings.cpu_kernel,
                  "tokens": len(g.token_ids)}))
"""


def _run(command, **kw):
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **kw)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
    return done


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A fresh venv with the wheel (built from an sdist of this tree) installed: its python."""
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "tree"
    files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    _run([sys.executable, "-c", "from setuptools import build_meta; build_meta.build_sdist('dist')"], cwd=tree)
    sdist = next((tree / "dist").glob("*.tar.gz"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheels"),
          str(sdist)])
    wheel = next((tmp / "wheels").glob("*.whl"))
    listing = _run([sys.executable, "-m", "zipfile", "-l", str(wheel)]).stdout
    for variant in kernel_build.variants_for(kernel_build.machine()):
        assert f"offload_moe/kernels/{kernel_build.library_name(variant)}" in listing
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]                       # torch, numpy, ... of this interpreter
    Path(purelib, "deps.pth").write_text(deps + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    return python


def probe(python: Path, tmp: Path, **env) -> dict:
    done = _run([str(python), "-c", PROBE], cwd=tmp,
                env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "CC": "false",
                     "XDG_CACHE_HOME": str(tmp / "cache"), **env})
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "KernelWarning" not in done.stderr, done.stderr                 # no fallback, no rebuild
    assert not (tmp / "cache").exists()                                     # nothing compiled
    return out


def test_the_wheel_runs_the_demo_with_native_kernels_without_a_compiler(fresh, tmp_path):
    best = native.best_variant()[0]
    out = probe(fresh, tmp_path)
    assert Path(out["package"]).is_relative_to(fresh.parents[1]), out      # the wheel's package, not this tree
    assert out["variant"] == best and out["qmv"].endswith(f", {best}") and out["decode"] == best
    assert out["tokens"] == 6 and out["cpu_kernel"].endswith(f", {best})")


@pytest.mark.skipif(not kernel_build.VARIANTS["avx2"][2] <= (native.cpu_features() or set()),
                    reason="this CPU cannot run the AVX2 variant")
def test_the_wheel_runs_the_demo_with_the_avx2_variant_forced(fresh, tmp_path):
    out = probe(fresh, tmp_path, OFFLOAD_MOE_ISA="avx2")
    assert out["variant"] == "avx2" and out["qmv"] == "AVX2, avx2" and out["tokens"] == 6


def test_the_wheel_command_line_generates(fresh, tmp_path):
    done = _run([str(fresh.parent / "offload-moe"), "generate", "ROMEO. What light", "--max-new-tokens", "8",
                 "--seed", "0"], cwd=tmp_path, env={**os.environ, "CC": "false", "XDG_CACHE_HOME": str(tmp_path / "c")})
    assert done.stdout.strip() and "KernelWarning" not in done.stderr
