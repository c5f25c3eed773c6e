"""The bundled demo checkpoint (offload_moe/demo/) and its routing trace, as scripts/train_demo.py wrote them.

Checks that the checkpoint is a plain Hugging Face Mixtral directory that transformers loads, that the
recorded quality and routing figures meet the bar set for the demo (held-out perplexity well below
the unigram baseline, no starved expert), and that the trace file is well formed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "offload_moe" / "demo"
TRACE = ROOT / "benchmarks" / "traces" / "demo-heldout.json"

# Held-out-like text: Macbeth is one of the two plays kept out of training.
HELD_OUT_LIKE = (
    "Is this a dagger which I see before me,\n"
    "The handle toward my hand? Come, let me clutch thee:\n"
    "I have thee not, and yet I see thee still.\n"
)


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((DEMO / "config.json").read_text())


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((DEMO / "metrics.json").read_text())


def test_checkpoint_files(config):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json"):
        assert (DEMO / name).is_file(), name
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total <= 32 * 2**20, f"demo checkpoint is {total:,} bytes"
    assert config["model_type"] == "mixtral"
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
    assert config["num_hidden_layers"] >= 4
    for key in ("rope_theta", "max_position_embeddings", "rms_norm_eps", "num_key_value_heads",
                "intermediate_size", "hidden_size", "vocab_size", "bos_token_id", "eos_token_id", "torch_dtype"):
        assert key in config, key


def test_tensor_names_are_mixtral_per_expert(config):
    from safetensors import safe_open

    L, E = config["num_hidden_layers"], config["num_local_experts"]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(L):
        p = f"model.layers.{i}."
        expected |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        expected |= {p + "block_sparse_moe.gate.weight", p + "input_layernorm.weight",
                     p + "post_attention_layernorm.weight"}
        expected |= {p + f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(E) for w in ("w1", "w2", "w3")}
    with safe_open(str(DEMO / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        H, I = config["hidden_size"], config["intermediate_size"]
        assert tuple(f.get_slice("model.layers.0.block_sparse_moe.experts.0.w1.weight").get_shape()) == (I, H)
        assert tuple(f.get_slice("model.layers.0.block_sparse_moe.experts.0.w2.weight").get_shape()) == (H, I)
        assert tuple(f.get_slice("model.layers.0.block_sparse_moe.gate.weight").get_shape()) == (E, H)
    assert names == expected


def test_transformers_loads_checkpoint_and_logits_are_finite(config, metrics):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    ids = tok.encode(HELD_OUT_LIKE).ids
    assert ids[0] == config["bos_token_id"]
    assert tok.decode(ids) == HELD_OUT_LIKE                      # byte-level BPE round-trips exactly
    model = transformers.MixtralForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config["vocab_size"])
    assert torch.isfinite(logits).all()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:])).item()
    # well under the unigram baseline's cross-entropy (the trained model scores about 4.1 nats here)
    limit = math.log(metrics["held_out_perplexity"]["unigram"]) - 1.0
    assert nll < limit, f"held-out-like text: {nll:.2f} nats per token, expected < {limit:.2f}"


def test_chat_template_renders_with_special_tokens():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tok_config = json.loads((DEMO / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<s>" and tok_config["eos_token"] == "</s>"
    assert tok_config["model_max_length"] > 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(DEMO))
    messages = [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Who's there?"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<s><|system|>\nAnswer in verse.</s>\n<|user|>\nWho's there?</s>\n<|assistant|>\n")
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False).endswith("</s>\n")
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    ids = tok.encode(rendered, add_special_tokens=False).ids
    specials = [tok.token_to_id(t) for t in ("<s>", "<|system|>", "</s>", "<|user|>", "<|assistant|>")]
    assert [i for i in ids if i in specials] == [specials[0], specials[1], specials[2], specials[3],
                                                 specials[2], specials[4]]


def test_metrics_meet_the_demo_bar(config, metrics):
    ppl = metrics["held_out_perplexity"]
    assert 1.0 < ppl["moe"] < 0.5 * ppl["unigram"], ppl        # well below the unigram baseline
    shares = metrics["expert_load"]["share"]
    E = config["num_local_experts"]
    assert len(shares) == config["num_hidden_layers"]
    for layer, s in enumerate(shares):
        assert len(s) == E
        assert math.isclose(sum(s), 1.0, abs_tol=1e-3)
        assert min(s) >= 1 / (4 * E), f"layer {layer}: an expert gets {min(s):.4f} of the load (< 1/{4 * E})"
    locality = metrics["routing_locality"]
    assert len(locality["per_layer"]) == config["num_hidden_layers"]
    assert all(0.0 <= x <= 1.0 for x in locality["per_layer"])
    assert locality["random_uniform"] == pytest.approx(config["num_experts_per_tok"] / E)
    assert isinstance(metrics["seed"], int) and metrics["train"]["seconds"] > 0


def test_routing_trace_is_well_formed(config):
    trace = json.loads(TRACE.read_text())
    assert trace["format"] == "offload-moe-trace/1"
    assert isinstance(trace["model"], str) and isinstance(trace["source"], str)
    L, E, k = trace["num_layers"], trace["num_experts"], trace["top_k"]
    assert (L, E, k) == (config["num_hidden_layers"], config["num_local_experts"], config["num_experts_per_tok"])
    routes = trace["routes"]
    assert len(routes) >= 1000
    for token in routes:
        assert len(token) == L
        for experts in token:
            assert len(experts) == k and len(set(experts)) == k
            assert all(isinstance(e, int) and 0 <= e < E for e in experts)
