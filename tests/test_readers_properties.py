"""Property tests: arbitrary and mutated bytes fed to the readers of files a checkpoint brings
(safetensors headers, the shard index, config.json, tokenizer_config.json). Nothing escapes but
`OffloadMoeError`, nothing hangs (hypothesis' deadline), and a header the reader accepts is one
safetensors itself reads: every tensor it lists loads."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from offload_moe import OffloadMoeError
from offload_moe.checkpoints.config import SUPPORTED_MODEL_TYPES, ModelConfig
from offload_moe.checkpoints.safetensors_header import read_header
from offload_moe.checkpoints.sanity import index_weight_map
from offload_moe.generation.text import Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "offload_moe" / "demo"
SETTINGS = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

VALID = save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64),
              "c": torch.zeros(0, dtype=torch.float16)}, metadata={"format": "pt"})

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=4),
                           max_leaves=12)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


def read_or_refuse(file: Path, data: bytes):
    file.write_bytes(data)
    try:
        tensors = read_header(file)
    except OffloadMoeError as e:
        assert "\n" not in str(e)
        return None
    with safe_open(str(file), framework="pt") as f:  # accepted: safetensors must agree
        for name, info in tensors.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == info.shape
    return tensors


@SETTINGS
@given(data=st.binary(max_size=300))
def test_header_reader_on_arbitrary_bytes(scratch, data):
    read_or_refuse(scratch / "arbitrary.safetensors", data)


@SETTINGS
@given(cut=st.integers(0, len(VALID)), flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1),
                                                                st.integers(0, 255)), max_size=4),
       tail=st.binary(max_size=8))
def test_header_reader_on_mutated_files(scratch, cut, flips, tail):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    read_or_refuse(scratch / "mutated.safetensors", bytes(data[:cut]) + tail)


entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "I64", "U8", "BOOL", "Q4", ""]) | json_values,
    "shape": st.lists(st.integers(-2, 4), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 40), min_size=0, max_size=3) | json_values})


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=4), entry | json_values, max_size=4), data=st.binary(max_size=48))
def test_header_reader_on_arbitrary_headers(scratch, header, data):
    raw = json.dumps(header).encode()
    read_or_refuse(scratch / "headers.safetensors", struct.pack("<Q", len(raw)) + raw + data)


@SETTINGS
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps({"weight_map": v}).encode())
       | st.dictionaries(st.text(max_size=12), json_values, max_size=4).map(lambda v: json.dumps(v).encode()))
def test_index_reader(scratch, data):
    index = scratch / "model.safetensors.index.json"
    index.write_bytes(data)
    try:
        weight_map = index_weight_map(index)
    except OffloadMoeError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(v, str) and "/" not in v and v not in (".", "..") for v in weight_map.values())


DEMO_CONFIG = json.loads((DEMO / "config.json").read_text())


FAMILY_KEYS = ["rope_scaling", "layer_types", "quantization_config", "rope_parameters", "mlp_only_layers",
               "decoder_sparse_step", "moe_intermediate_size", "num_experts", "n_routed_experts", "kv_lora_rank",
               "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "topk_method", "n_group",
               "topk_group", "first_k_dense_replace", "use_sliding_window", "swiglu_limit", "clip_qkv"]


@SETTINGS
@given(family=st.sampled_from(SUPPORTED_MODEL_TYPES),
       changes=st.dictionaries(st.sampled_from(sorted(DEMO_CONFIG) + FAMILY_KEYS),
                               json_values | st.integers(-2, 10**12) | st.floats(), max_size=4))
def test_config_reader_on_mutated_configs(family, changes):
    base = {**DEMO_CONFIG, "model_type": family, "moe_intermediate_size": 64, "num_experts": 8, "kv_lora_rank": 16,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
    try:
        ModelConfig.from_dict({**base, **changes})
    except OffloadMoeError as e:
        assert "\n" not in str(e)


@SETTINGS
@given(data=st.binary(max_size=200))
def test_config_file_on_arbitrary_bytes(scratch, data):
    file = scratch / "config.json"
    file.write_bytes(data)
    with pytest.raises(OffloadMoeError):
        ModelConfig.load(file)  # no arbitrary bytes of this size make a whole config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    shutil.copy(DEMO / "tokenizer.json", d / "tokenizer.json")
    return d


@SETTINGS
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.sampled_from(["bos_token", "eos_token", "chat_template"]), json_values,
                         max_size=3).map(lambda v: json.dumps(v).encode()))
def test_tokenizer_config_reader(tokenizer_dir, data):
    (tokenizer_dir / "tokenizer_config.json").write_bytes(data)
    try:
        tok = Tokenizer(tokenizer_dir)
        if tok.chat_template:
            tok.render_chat([{"role": "user", "content": "hi"}])
    except OffloadMoeError as e:
        assert "\n" not in str(e)
