"""The bundled demo checkpoint (offload_moe/demo/) and its routing trace, as scripts/train_demo.py wrote them.

Checks that the checkpoint is a plain Hugging Face Mixtral directory that transformers loads, that the
figures recorded beside it are what this code computes from it: offload_moe's model, on the first
256-token window of the held-out text the trace was recorded on (`tests/data/macbeth-act1-head.txt`,
the public-domain text as scripts/train_demo.py cut it), routes every token exactly as the trace
says, scores the recorded held-out perplexity (within the spread of a short slice), and starves no
expert; and that the trace file is well formed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "offload_moe" / "demo"
TRACE = ROOT / "benchmarks" / "traces" / "demo-heldout.json"
MACBETH = ROOT / "tests" / "data" / "macbeth-act1-head.txt"  # the trace's source text, its first window
WINDOW = 256  # the demo's context: the trace was recorded in windows of this many tokens

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


@pytest.fixture(scope="module")
def window(config) -> list[int]:
    """The trace's first window: <s>, then the held-out text's first tokens (as train_demo.py encodes)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    ids = [config["bos_token_id"]] + tok.encode(MACBETH.read_text(), add_special_tokens=False).ids
    assert len(ids) > WINDOW
    return ids[:WINDOW]


@pytest.fixture(scope="module")
def scored(window):
    """offload_moe's demo model on the window: (fp32 logits (T, V), routes[t][layer] = top-k ids)."""
    import offload_moe
    import torch

    model = offload_moe.load(None, device="cpu", dtype="float32")
    routed: dict[int, list] = {}

    def record(layer):
        def hook(block, args):
            x = args[0]
            routed[layer] = block.route(x.reshape(-1, x.shape[-1]))[1].tolist()
        return hook

    hooks = [b.register_forward_pre_hook(record(i)) for i, b in enumerate(model.transformer.moe_blocks)]
    try:
        logits = model.logits(torch.tensor([window]))[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, [[routed[layer][t] for layer in sorted(routed)] for t in range(len(window))]


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


def test_transformers_loads_checkpoint_and_logits_are_finite(config, metrics, window, scored):
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
    with torch.no_grad():  # and offload_moe computes what transformers computes (recorded: 0.0 difference)
        theirs = model(torch.tensor([window])).logits[0]
    diff = (scored[0] - theirs).abs().max().item()
    assert diff < 1e-4, f"offload_moe vs transformers on the held-out window: max |logit diff| {diff:.2e}"


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


def test_recorded_trace_is_how_the_checkpoint_routes(config, scored):
    """The committed trace's first window, recomputed by offload_moe's router: every token, every
    layer, the same experts in the same order (highest weight first); no expert starved on it."""
    _, routes = scored
    trace = json.loads(TRACE.read_text())["routes"]
    assert routes == trace[:WINDOW]
    E, k = config["num_local_experts"], config["num_experts_per_tok"]
    for layer in range(config["num_hidden_layers"]):
        load = [sum(e in token[layer] for token in routes) / (k * len(routes)) for e in range(E)]
        assert min(load) >= 1 / (4 * E), f"layer {layer}: an expert gets {min(load):.4f} of the load (< 1/{4 * E})"


def test_recorded_perplexity_is_what_the_checkpoint_scores(metrics, window, scored):
    """The held-out perplexity in metrics.json (over both held-out plays) against the cross-entropy
    offload_moe's model scores on one window of one of them: equal within half a nat (a short
    slice's spread), and well below the unigram baseline."""
    import torch

    nll = torch.nn.functional.cross_entropy(scored[0][:-1], torch.tensor(window[1:])).item()
    recorded = metrics["held_out_perplexity"]
    assert abs(nll - math.log(recorded["moe"])) < 0.5, f"{nll:.3f} nats vs recorded {math.log(recorded['moe']):.3f}"
    assert nll < math.log(recorded["unigram"]) - 1.0


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
