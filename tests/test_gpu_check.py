"""scripts/gpu_check.sh end to end without a GPU: toy sizes, Triton through its interpreter, every CUDA
measurement saying it was skipped, at most 8 files written, each step finished in its limit."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FILES = {"env.json", "tests.txt", "h2d.json", "triton.json", "syncs.json", "bench.json", "bench.txt", "log.txt"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script measures for real (minutes)")
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": ""}
    res = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    log = (tmp_path / "log.txt").read_text()
    assert res.returncode == 0, res.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} == FILES
    for step in ("env", "h2d", "triton", "syncs", "bench"):
        assert f"{step}: ok" in log, log
    assert "tests: skipped" in log and "skipped" in (tmp_path / "tests.txt").read_text()
    for name in ("h2d", "syncs"):
        assert "no CUDA" in json.loads((tmp_path / f"{name}.json").read_text())["skipped"]
    triton = json.loads((tmp_path / "triton.json").read_text())
    if importlib.util.find_spec("triton"):  # the kernels ran at toy size and matched float64
        assert {r["bits"] for r in triton["results"]} == {2, 3, 4, 8}
        assert all(r["max_rel_error"] < 1e-5 for r in triton["results"])
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["model"]["source"] == "synthetic:mixtral-8x7b-int4"
    assert [r["status"] for r in bench["rows"]][:4] == ["ok"] * 4 and bench["same_tokens"] is True
