"""GGUF in (issue 18) against llama.cpp itself: its converter, `llama-quantize`, `llama-simple`
(greedy) and `llama-tokenize`. Skipped unless $LLAMA_CPP_DIR names a llama.cpp checkout whose
build/bin holds those binaries (see BENCHMARKS.md, "GGUF in")."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from gguf_fixtures import llamacpp_bin, llamacpp_convert, llamacpp_dir
from test_gguf import MIXED_TEXT

import offload_moe
from offload_moe.api import DEMO_DIR
from offload_moe.gguf import GGUFCheckpoint

pytestmark = pytest.mark.skipif(
    llamacpp_dir() is None or not all(llamacpp_bin(b) for b in ("llama-quantize", "llama-simple", "llama-tokenize")),
    reason="llama.cpp not available: set LLAMA_CPP_DIR to a checkout with build/bin/llama-{quantize,simple,tokenize}")

PROMPT = "ROMEO: What light through yonder window"
FORMATS = ["F32", "Q8_0", "Q4_0", "Q4_K_M"]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamacpp")
    f32 = llamacpp_convert(DEMO_DIR, d / "demo-F32.gguf", "f32")
    files = {"F32": f32}
    for q in FORMATS[1:]:
        files[q] = d / f"demo-{q}.gguf"
        subprocess.run([str(llamacpp_bin("llama-quantize")), str(f32), str(files[q]), q, "2"], check=True,
                       capture_output=True)
    return files


def llama_greedy(path, n: int) -> str:
    out = subprocess.run([str(llamacpp_bin("llama-simple")), "-m", str(path), "-n", str(n), PROMPT],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return out.split(PROMPT, 1)[1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_text_equals_llama_cpp(demo_files, fmt):
    # The dequantize-and-multiply path in fp32: on the CPU, cpu_experts="auto" computes packed
    # experts with torch's int4 kernel in bf16, which flips a near-tie (margin 0.015) at token 25
    # of Q4_K_M (BENCHMARKS.md, "GGUF in").
    model = offload_moe.load(demo_files[fmt], device="cpu", dtype="float32", cpu_experts="none")
    ours = model.generate(PROMPT, max_new_tokens=32, temperature=0).text
    theirs = llama_greedy(demo_files[fmt], 32)
    assert ours == theirs[:len(ours)] and len(ours) > 20, (ours, theirs)


def test_formats_stay_packed(demo_files):
    """Q4_K_M on the demo's 160/320-wide rows falls back to Q5_0 / Q5_1 / Q8_0 (not multiples of 256)."""
    ckpt = GGUFCheckpoint(demo_files["Q4_K_M"])
    w = ckpt.expert(0, 0)
    assert all(not isinstance(w[k], torch.Tensor) for k in ("w1", "w3", "w2"))


@pytest.mark.parametrize("fmt", ["F32", "Q4_K_M"])
def test_tokenization_equals_llama_tokenize(demo_files, fmt):
    out = subprocess.run([str(llamacpp_bin("llama-tokenize")), "-m", str(demo_files[fmt]), "-p", MIXED_TEXT,
                          "--ids", "--log-disable"], capture_output=True, text=True, timeout=120, check=True).stdout
    theirs = [int(i) for i in re.findall(r"\d+", out.strip().splitlines()[-1])]
    ours = GGUFCheckpoint(demo_files[fmt]).tokenizer().encode(MIXED_TEXT)
    assert len(MIXED_TEXT) > 300 and ours == theirs
