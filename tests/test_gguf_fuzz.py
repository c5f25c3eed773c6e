"""The GGUF reader under 20,000+ mutated valid files (tests/fuzz_gguf.py, hypothesis): every input
opens or ends in `OffloadMoeError` with one line, none hangs or blows memory up. Slow (minutes):
`pytest -m slow tests/test_gguf_fuzz.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gguf_reader_fuzz():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_gguf.py"), "--examples", "20500", "--seed", "0"],
                          capture_output=True, text=True, env=env, timeout=3600)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    assert "0 other outcomes" in done.stdout, done.stdout
