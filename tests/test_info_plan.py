"""`info` and `plan` agree, whatever the demo model comes as: its safetensors, a GGUF of each type the
demo's shapes allow (written as llama.cpp's converter lays them out, gguf_fixtures.py), and our own
quantized checkpoint. The same parameter counts, the same weights by kind (a GGUF's `ffn_norm` is a
norm, not a dense MLP), and those kinds' parameters are what config.json implies.

The oracles: `ModelConfig.params_by_kind` (config.json alone), the safetensors file's own bytes for an
F32 GGUF (the same floats), `gguf.GGML_QUANT_SIZES` for a quantized one, the planner's byte formulas
for our format. (K-quants need rows of 256 weights; the demo's are 160 and 320 wide, so none here.)"""

from __future__ import annotations

import math

import gguf
import pytest

from gguf_fixtures import T, write_gguf
from offload_moe.checkpoints.checkpoint import weight_kind
from offload_moe.cli.main import main
from offload_moe.placement.planner import plan
from offload_moe.placement.profiles import load_profile
from offload_moe.base.runtime import DEMO_DIR, fmt_count
from offload_moe.api.sources import open_checkpoint
from offload_moe.tools.convert import quantize

# name -> (experts type, attention type); everything else F32, as gguf_fixtures writes it
GGUF_TYPES = {"f32": (T.F32, T.F32), "f16": (T.F16, T.F16), "q8_0": (T.Q8_0, T.Q8_0), "q4_0": (T.Q4_0, T.Q4_0),
              "q4_1": (T.Q4_1, T.Q4_1), "q5_0": (T.Q5_0, T.Q5_0), "q5_1": (T.Q5_1, T.Q5_1),
              "mxfp4": (T.MXFP4, T.F32)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-as")
    found = {"safetensors": DEMO_DIR}
    for name, (experts, attention) in GGUF_TYPES.items():
        found[name] = write_gguf(DEMO_DIR, root / f"demo-{name}.gguf", experts=experts, attention=attention)
    found["ours-int4"] = quantize(DEMO_DIR, root / "demo-int4", experts="int4", attention="int8",
                                  group_size=32, method="rtn", device="cpu")
    return found


def table(capsys, *args) -> dict[str, str]:
    """The rows of the table a command prints: label -> value (wrapped values joined)."""
    assert main(list(map(str, args))) == 0
    rows, last = {}, None
    for line in capsys.readouterr().out.splitlines():
        if not line.startswith("│"):
            continue
        label, value = (cell.strip() for cell in line.strip("│").split("│"))
        if label:
            rows[label], last = value, label
        else:
            rows[last] += " " + value
    return rows


@pytest.mark.parametrize("source", ["safetensors", "f32", "q8_0", "q4_0", "mxfp4", "ours-int4"])
def test_info_and_plan_agree_on_parameters_and_weights(sources, source, capsys):
    path = sources[source]
    config = open_checkpoint(path).config
    info = table(capsys, "info", path)
    planned = table(capsys, "plan", path, "--profile", "cpu")
    total, active = fmt_count(config.total_params), fmt_count(config.active_params)
    assert (info["parameters total"], info["parameters active per token"]) == ("6.54M", "2.85M") == (total, active)
    assert planned["parameters"] == f"{total} total, {active} active per token"
    weights = {k: v for k, v in info.items() if k.startswith("weights: ")}
    assert list(weights) == [f"weights: {k}" for k in ("attention", "experts", "routers", "embeddings", "norms")]
    assert {k: v for k, v in planned.items() if k.startswith("weights: ")} == weights
    assert "site-pack…" not in planned["profile"] and planned["profile"].replace(" ", "").endswith("cpu.toml)")


@pytest.mark.parametrize("source", ["safetensors", *GGUF_TYPES, "ours-int4"])
def test_parameters_by_kind_are_what_the_config_implies(sources, source):
    ckpt = open_checkpoint(sources[source])
    assert {k: p for k, (p, _) in ckpt.weights_by_kind().items()} == ckpt.config.params_by_kind()


@pytest.mark.parametrize("source", list(GGUF_TYPES))
def test_a_gguf_files_bytes_by_kind(sources, source):
    """An F32 file holds the safetensors' bytes kind for kind; a quantized one its types' block sizes."""
    by_kind = {k: b for k, (_, b) in open_checkpoint(sources[source]).weights_by_kind().items()}
    params = open_checkpoint(DEMO_DIR).config.params_by_kind()
    experts, attention = GGUF_TYPES[source]
    vectors = sum(math.prod(shape) for name, shape in open_checkpoint(DEMO_DIR).expected_shapes().items()
                  if len(shape) == 1 and weight_kind(name) == "attention")  # biases, q/k norms: F32 as written

    def size(qtype, n):
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        return n // block * nbytes

    if source == "f32":
        demo = {k: b for k, (_, b) in open_checkpoint(DEMO_DIR).weights_by_kind().items()}
        assert by_kind == demo
    assert by_kind["experts"] == size(experts, params["experts"])
    assert by_kind["attention"] == size(attention, params["attention"] - vectors) + 4 * vectors
    for kind in ("routers", "embeddings", "norms"):
        assert by_kind[kind] == 4 * params[kind], kind


def test_our_quantized_files_bytes_are_the_plans(sources):
    """Our format's experts, attention and embeddings take in the files what the planner's formulas say."""
    ckpt = open_checkpoint(sources["ours-int4"])
    by_kind = {k: b for k, (_, b) in ckpt.weights_by_kind().items()}
    p = plan(ckpt.config, load_profile("cpu"), ram_available=2**40)
    c = ckpt.config
    assert by_kind["experts"] == c.num_moe_layers * c.num_experts * p.bytes_per_expert
    assert by_kind["attention"] == p.attention_bytes
    assert by_kind["embeddings"] == p.embedding_bytes
