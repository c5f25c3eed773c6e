"""scripts/make_real_gguf.py: random-weight GGUF files with real tensor shapes (issue 25's benchmark).

Fast: every block type's random blocks, decoded by gguf.quants (the oracle), are finite with the
spread asked for; a file written through the streaming writer reads back with the shapes and types
given. Slow (`-m slow`, and $LLAMA_CPP_DIR): the whole path, llama.cpp's converter included, for each
family with --tiny --layers 2; the file loads in gguf's reader, in offload_moe (finite logits) and,
when its binaries are built, runs in llama.cpp."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_fixtures import llamacpp_bin, llamacpp_dir

import offload_moe

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("make_real_gguf", ROOT / "scripts" / "make_real_gguf.py")
mrg = sys.modules.setdefault("make_real_gguf", importlib.util.module_from_spec(spec))
spec.loader.exec_module(mrg)
T = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [t for t in mrg.TYPES.values() if t != T.F32], ids=lambda t: t.name)
def test_random_blocks_are_valid_and_spread_as_asked(qtype):
    rng = np.random.default_rng(0)
    scales = None if qtype in (T.F16, T.BF16) else mrg.calibrate(qtype, rng)
    width = 256 * 4
    tensor = mrg.RandomTensor("blk.0.ffn_up_exps.weight", (4, 64, width), qtype, 1, scales, mrg.Noise(1))
    raw = tensor.fill(np.random.default_rng(2), tensor.rows)
    assert raw.nbytes == tensor.nbytes
    values = gguf.quants.dequantize(raw.reshape(tensor.rows, tensor.row_bytes), qtype).astype(np.float64)
    assert values.shape == (tensor.rows, width) and np.isfinite(values).all()
    # within a factor of two of the asked spread (block scales jitter by 0.5-1.5x; MXFP4 rounds to a power
    # of two), centred (a min field cancels the mean where the type has one)
    assert mrg.WEIGHT_STD / 2 < values.std() < mrg.WEIGHT_STD * 2
    assert abs(values.mean()) < values.std() / 4


def test_width_map_refuses_a_tiny_width_that_means_two_real_ones():
    family = mrg.Family("x", {}, ("hidden", "expert_width", "experts"))
    real = dict(num_attention_heads=4, hidden_size=2048, intermediate_size=768, num_local_experts=8,
                num_key_value_heads=2, vocab_size=100)
    assert mrg.width_map(family, real, {**real, "hidden_size": 64, "intermediate_size": 32}) == \
        {64: 2048, 32: 768, 8: 8, 100: 100}
    with pytest.raises(AssertionError, match="stands for both"):
        mrg.width_map(family, real, {**real, "hidden_size": 64, "intermediate_size": 64})


def test_streamed_file_reads_back_with_its_layout(tmp_path):
    """The writer's own path (fields, layer repetition, tiny->real widths, type fallback) without the converter."""
    src = tmp_path / "keys.gguf"
    w = gguf.GGUFWriter(str(src), "qwen3moe")
    w.add_block_count(3)
    w.add_embedding_length(96)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    fields = list(gguf.GGUFReader(src).fields.values())
    tensors = [("token_embd.weight", (10, 4), T.F16), ("blk.{}.attn_norm.weight", (4,), T.F32),
               ("blk.{}.ffn_up_exps.weight", (3, 2, 4), T.F16), ("output.weight", (10, 4), T.F16)]
    layout = mrg.Layout("qwen3-30b-a3b", "qwen3moe", 3, fields, fields, tensors, {10: 50, 4: 96, 3: 8, 2: 64})
    out = tmp_path / "out.gguf"
    info = mrg.write(layout, out, layers=2, qtype=T.Q4_K, expert_type=T.Q4_0, tiny=False)
    r = gguf.GGUFReader(out)
    assert r.fields["qwen3moe.block_count"].contents() == 2 and r.fields["qwen3moe.embedding_length"].contents() == 96
    got = {t.name: (tuple(int(n) for n in reversed(t.shape)), T(t.tensor_type)) for t in r.tensors}
    assert got == {"token_embd.weight": ((50, 96), T.Q8_0),  # 96 is no whole number of Q4_K's 256-blocks
                   "blk.0.attn_norm.weight": ((96,), T.F32), "blk.1.attn_norm.weight": ((96,), T.F32),
                   "blk.0.ffn_up_exps.weight": ((8, 64, 96), T.Q4_0), "blk.1.ffn_up_exps.weight": ((8, 64, 96), T.Q4_0),
                   "output.weight": ((50, 96), T.Q8_0)}
    for t in r.tensors:
        assert np.isfinite(gguf.quants.dequantize(t.data, t.tensor_type)).all()
    assert info["bytes"] == out.stat().st_size


@pytest.mark.slow
@pytest.mark.skipif(llamacpp_dir() is None, reason="needs $LLAMA_CPP_DIR (llama.cpp's converter)")
@pytest.mark.parametrize("family", sorted(mrg.FAMILIES))
def test_tiny_file_loads_in_gguf_offload_moe_and_llamacpp(family, tmp_path):
    out = tmp_path / f"{family}.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_real_gguf.py"), family, str(out), "--tiny",
                    "--layers", "2", "--llama-cpp", str(llamacpp_dir())], check=True, capture_output=True)
    r = gguf.GGUFReader(out)
    assert r.fields["general.architecture"].contents() in ("qwen3moe", "llama", "gpt-oss")
    for t in r.tensors:
        assert np.isfinite(gguf.quants.dequantize(t.data, t.tensor_type)).all(), t.name
    model = offload_moe.load(str(out), device="cpu")
    assert model.config.num_layers == 2
    logits = model.logits(torch.tensor([list(range(10, 20))]))
    assert torch.isfinite(logits).all()
    exe = llamacpp_bin("llama-completion")
    if exe is not None:
        done = subprocess.run([str(exe), "-m", str(out), "-p", "Hello", "-n", "4", "-no-cnv", "--temp", "0", "-t", "2"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-500:]
