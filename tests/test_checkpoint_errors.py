"""Broken checkpoints and bad arguments: one line naming the file, tensor or value; CLI exit 1."""

import json
import shutil
import subprocess
import sys

import pytest

import offload_moe
from offload_moe import OffloadMoeError


def broken_copy(tiny_checkpoint, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], directory)
    return directory


def assert_one_line(error: Exception, *needles: str):
    message = str(error)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_directory(tmp_path):
    with pytest.raises(OffloadMoeError) as e:
        offload_moe.load(tmp_path / "nowhere")
    assert_one_line(e.value, "nowhere", "no such checkpoint directory")


def test_missing_config(tiny_checkpoint, tmp_path):
    d = broken_copy(tiny_checkpoint, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(OffloadMoeError) as e:
        offload_moe.load(d)
    assert_one_line(e.value, "config.json", "not found")


def test_unsupported_model_type_lists_supported(tiny_checkpoint, tmp_path):
    d = broken_copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OffloadMoeError) as e:
        offload_moe.load(d)
    from offload_moe.checkpoints.config import SUPPORTED_MODEL_TYPES
    assert {"deepseek_v2", "gpt_oss", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"} <= set(SUPPORTED_MODEL_TYPES)
    assert_one_line(e.value, "'llama'", "supported: " + ", ".join(SUPPORTED_MODEL_TYPES))


def test_config_key_of_wrong_type(tiny_checkpoint, tmp_path):
    d = broken_copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_local_experts"] = "eight"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OffloadMoeError) as e:
        offload_moe.load(d)
    assert_one_line(e.value, "num_local_experts", "'eight'", "integer")


def test_index_names_missing_shard(tiny_checkpoint, tmp_path):
    d = broken_copy(tiny_checkpoint, tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(OffloadMoeError) as e:
        offload_moe.load(d)
    assert_one_line(e.value, shard.name, "missing")


def test_truncated_shard(tiny_checkpoint, tmp_path):
    d = broken_copy(tiny_checkpoint, tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(OffloadMoeError) as e:
        offload_moe.load(d)
    assert_one_line(e.value, shard.name, "truncated")


def test_shape_disagrees_with_config(tiny_checkpoint, tmp_path):
    d = broken_copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64  # checkpoint experts are 48 wide
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OffloadMoeError) as e:
        offload_moe.load(d)
    assert_one_line(e.value, "w1.weight", "[48, 32]", "[64, 32]")


def test_empty_prompt(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], device="cpu")
    for prompt in ("", []):
        with pytest.raises(OffloadMoeError) as e:
            model.generate(prompt)
        assert_one_line(e.value, "prompt is empty")


def test_token_id_outside_vocabulary(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], device="cpu")
    with pytest.raises(OffloadMoeError) as e:
        model.generate([1, 500])
    assert_one_line(e.value, "500", "vocabulary")


def test_cli_reports_one_line_and_exits_nonzero(tiny_checkpoint, tmp_path):
    d = broken_copy(tiny_checkpoint, tmp_path)
    sorted(d.glob("model-*.safetensors"))[0].write_bytes(b"\x00" * 4)
    result = subprocess.run([sys.executable, "-m", "offload_moe", "info", str(d)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "not a safetensors file" in result.stderr
