"""README's "Make a GGUF from a checkpoint" runs as written: its commands, in a scratch directory that
holds this repository's `scripts/` and `offload_moe/`, a `llama.cpp` checkout ($LLAMA_CPP_DIR instead of
the clone) and `.venv` (this venv), with `sentencepiece` made unimportable (a fresh venv has
none), write a GGUF that `offload-moe generate` runs and whose `info` counts what the demo's does.
Skipped without $LLAMA_CPP_DIR; the clone and the pip line are checked, not run (no network in tests)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_fixtures import llamacpp_dir

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(llamacpp_dir() is None,
                                reason="llama.cpp not available: set LLAMA_CPP_DIR to a llama.cpp checkout")


def recipe() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Make a GGUF from a checkpoint", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def test_the_readmes_gguf_recipe_runs_as_written(tmp_path):
    lines = recipe()
    assert lines[0] == "git clone --depth 1 https://github.com/ggml-org/llama.cpp"
    assert shlex.split(lines[1])[:3] == [".venv/bin/pip", "install", "-q"]
    for package in shlex.split(lines[1])[3:]:   # what the recipe installs is what the converter needs here
        assert subprocess.run([sys.executable, "-c", f"import {package}"]).returncode == 0, package
    for name in ("scripts", "offload_moe"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "llama.cpp").symlink_to(llamacpp_dir())
    (tmp_path / ".venv").symlink_to(sys.prefix)  # this venv (its pyvenv.cfg too, so .venv/bin/python is it)
    blocked = tmp_path / "no-sentencepiece"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text("import sys\nsys.modules['sentencepiece'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(blocked), "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    for line in lines[2:]:
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (line, done.stderr[-2000:])
    assert done.stdout.strip()                                   # generate's text
    out = [f for f in tmp_path.iterdir() if f.suffix == ".gguf"]
    assert len(out) == 1
    info = subprocess.run([sys.executable, "-m", "offload_moe", "info", str(out[0])], env=env, capture_output=True,
                          text=True, timeout=120)
    assert "6.54M" in info.stdout and "2.85M" in info.stdout and "dense MLPs" not in info.stdout, info.stdout
