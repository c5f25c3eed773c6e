"""GGUF in (issue 18), against the gguf package: files written by its `GGUFWriter` with blocks from
its quantizers; every imported tensor against `gguf.quants.dequantize`; logits against the same
dequantized weights loaded as floats; offloaded == resident bit for bit; the tokenizer and chat
template from the header; one line for each bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_fixtures import T, encode, write_gguf
from test_families import BASE, FAMILIES

import offload_moe
from offload_moe import OffloadMoeError
from offload_moe.checkpoints.gguf import GGUFCheckpoint, blocks
from offload_moe.kernels import cpu_int4, cpu_qmv, native
from offload_moe.kernels import ggml as ggml_weights
from offload_moe.kernels import modules as quant_modules
from offload_moe.base.runtime import DEMO_DIR
from offload_moe.api.sources import open_tokenizer
from offload_moe.generation.text import Tokenizer
from offload_moe import Placement

EXACT = [T.Q8_0, T.Q4_0, T.Q5_0]                          # one fp16 scale and an integer zero
ROUNDED = [T.Q4_1, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]  # fp16 rounding of a · sc, -b / a
MIXED_TEXT = ("ROMEO: What light through yonder window breaks?\n\tIt is the east, and Juliet is the sun!  "
              "Numbers 1234567 and 3.14159; symbols <>{}[]|~^ `code` — dashes, “quotes”, café, naïve, "
              "Größe, 東京, Привет, emoji 🙂🚀, tabs\t\tand  double  spaces, don't, I'll, we've, "
              "CAPS LOCK, mIxEd CaSe, trailing spaces   \n\nnew paragraph.")


def _rows(qtype, shape=(6, 512), seed=0):
    """Blocks for a [rows, cols] matrix: the gguf package's quantizer where it has one."""
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return encode(data, qtype, seed)


@pytest.mark.parametrize("qtype", EXACT + ROUNDED, ids=lambda t: t.name)
def test_blocks_equal_the_gguf_reference_dequantization(qtype):
    raw = _rows(qtype)
    reference = gguf.quants.dequantize(raw, qtype)  # [6, 512]
    ours = blocks.to_quantized(torch.from_numpy(raw.copy()).reshape(-1), qtype, reference.shape)
    bits, group = blocks.PACKED[qtype]
    assert (ours.bits, ours.group_size) == (bits, group)
    got = ours.dequantize().numpy()
    if qtype in EXACT:
        assert np.array_equal(got, reference)
    else:  # within fp16 rounding (2^-11 relative) of a block's scales and offsets
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        g = reference.reshape(-1, block)
        bound = 2.0**-9 * np.abs(g).max(axis=1, keepdims=True)
        assert np.all(np.abs(got.reshape(-1, block) - g) <= bound)


def test_mxfp4_is_repacked_exactly():
    raw = _rows(T.MXFP4, (4, 128))
    w = blocks.to_mxfp4(torch.from_numpy(raw.copy()).reshape(-1), (4, 128))
    assert w.nbytes == raw.size  # still 4.25 bits per weight
    assert np.array_equal(w.dequantize().numpy(), gguf.quants.dequantize(raw, T.MXFP4))


def test_widening_keeps_the_values():
    raw = _rows(T.Q3_K, (4, 256))
    qw = blocks.to_quantized(torch.from_numpy(raw.copy()).reshape(-1), T.Q3_K, (4, 256))
    from offload_moe.checkpoints.gguf.checkpoint import widen

    wide = widen(qw, 8, 16)
    assert wide.bits == 8 and torch.equal(wide.dequantize(), qw.dequantize())


# ---------------------------------------------------------------- families

FAMILY_CASES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v2_group", "gpt_oss"]
GGUF_WIDTHS = {"qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=32),
               "olmoe": dict(intermediate_size=32),
               "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64),
               "deepseek_v2": dict(moe_intermediate_size=32, intermediate_size=64),
               "deepseek_v2_group": dict(moe_intermediate_size=32, intermediate_size=64),
               # llama.cpp fixes gpt-oss's SwiGLU clamp at 7 and truncates YaRN's correction range
               "gpt_oss": dict(swiglu_limit=7.0, rope_parameters=dict(
                   rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                   original_max_position_embeddings=32))}


def _hf_dir(name: str, tmp_path_factory):
    if name == "mixtral":
        from conftest import tiny_mixtral

        model = tiny_mixtral(hidden_size=256, intermediate_size=256)  # rows of 256: whole k-quant blocks
    else:  # the family's test config, widths multiples of 32 (ggml blocks)
        import transformers

        prefix, overrides = FAMILIES[name]
        config = getattr(transformers, f"{prefix}Config")(**{**BASE, **overrides, **GGUF_WIDTHS[name]})
        torch.manual_seed(0)
        model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                p.normal_(1, 0.1) if pname.endswith("norm.weight") else p.normal_(0, 0.2)
    d = tmp_path_factory.mktemp(f"gguf-{name}")
    model.save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return {name: _hf_dir(name, tmp_path_factory) for name in FAMILY_CASES}


def _logits(model_or_path, ids, **kw):
    m = offload_moe.load(model_or_path, Placement(cpu_experts="none"), device="cpu", dtype="float32", **kw) \
        if isinstance(model_or_path, Path) \
        else model_or_path
    return m.logits(ids)


IDS = torch.tensor([[1, 17, 42, 5, 66, 23, 9, 31]])


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_float_gguf_matches_transformers(families, name, tmp_path):
    d, model = families[name]
    path = write_gguf(d, tmp_path / "m.gguf")
    with torch.no_grad():
        expected = model(IDS).logits
    assert (_logits(path, IDS) - expected).abs().max().item() < 1e-4


def _dequantized_twin(path: Path, out: Path) -> Path:
    """The same file with every tensor replaced by the gguf package's dequantization, as F32."""
    src = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(out), src.fields["general.architecture"].contents())
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for t in src.tensors:
        data = gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape(tuple(reversed(t.shape.tolist()))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("name,experts,attention", [
    ("mixtral", T.Q4_K, T.Q8_0), ("mixtral", T.Q6_K, T.Q4_0), ("mixtral", T.Q3_K, T.Q5_1),
    ("mixtral", T.Q2_K, T.Q4_1), ("mixtral", T.Q5_K, T.Q5_0), ("mixtral", T.Q8_0, T.Q4_K),
    ("qwen3_moe", T.Q4_0, T.Q8_0), ("olmoe", T.Q8_0, T.Q8_0), ("qwen2_moe", T.Q4_1, T.Q8_0),
    ("deepseek_v2", T.Q8_0, T.F32), ("gpt_oss", T.MXFP4, T.Q8_0)],
    ids=lambda v: v if isinstance(v, str) else v.name)
def test_quantized_gguf_matches_its_dequantized_weights(families, name, experts, attention, tmp_path, monkeypatch):
    d, _ = families[name]
    if name != "mixtral" and experts in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        pytest.skip("k-quants need rows of 256")
    path = write_gguf(d, tmp_path / "q.gguf", experts=experts, attention=attention, embeddings=attention)
    ckpt = GGUFCheckpoint(path)
    # every imported expert equals the reference dequantization (within fp16 rounding of the scales)
    t = ckpt.tensors[f"blk.{ckpt.config.moe_layers[0]}.ffn_down_exps.weight"]
    reference = gguf.quants.dequantize(np.array(t.data), T(t.type))
    for e in range(ckpt.config.num_experts):
        w = ckpt.expert(ckpt.config.moe_layers[0], e)["w2"]
        assert not isinstance(w, torch.Tensor)  # stays packed
        bound = 2.0**-10 * np.abs(reference[e]).max()
        assert np.abs(w.dequantize().numpy() - reference[e]).max() <= bound
    twin = _dequantized_twin(path, tmp_path / "twin.gguf")
    expected = _logits(twin, IDS)
    # the import, checked exactly: dense packed weights through the dequantize-then-multiply
    # reference, not the packed CPU kernels, which compute from bf16 or int8 activations (their accuracy
    # on every GGUF type is test_cpu_kernels_on_gguf_types'; their noise flips near-tied routes
    # in these random tiny models, so logits would not show an import bug apart from it)
    monkeypatch.setattr(quant_modules, "has_cpu_kernel", lambda qw: False)
    monkeypatch.setattr(ggml_weights, "kernel", lambda: None)   # GGMLWeight views: the reference product too
    got = _logits(path, IDS)
    tol = 1e-4 if {experts, attention} <= {*EXACT, T.F32, T.MXFP4} else 2e-2 * expected.abs().max().item()
    assert (got - expected).abs().max().item() < tol


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K], ids=lambda t: t.name)
@pytest.mark.parametrize("kernel", ["torch-int4", "qmv"])
def test_cpu_kernels_on_gguf_types(qtype, kernel):
    """Every GGUF type the packed CPU kernels take (5-bit ones as 8-bit codes < 32, Q4_1's fp16
    zeros) is computed within the kernel's documented tolerance of float64 math on the imported weight."""
    module, supported, convert = {"torch-int4": (cpu_int4, cpu_int4.int4_supported, cpu_int4.to_int4_planes),
                                  "qmv": (cpu_qmv, cpu_qmv.qmv_supported, cpu_qmv.to_qmv)}[kernel]
    if kernel == "torch-int4" and not cpu_int4.int4_ops_available():
        pytest.skip("this torch has no int4 CPU kernel")
    if kernel == "qmv" and native.load() is None:
        pytest.skip(f"the qmv kernel is not built here: {native.status()}")
    O, I = 64, 512
    data = np.random.default_rng(0).standard_normal((O, I)).astype(np.float32) * 0.05
    raw = torch.from_numpy(np.ascontiguousarray(encode(data, qtype)).view(np.uint8)).reshape(O, -1)
    qw = blocks.to_quantized(raw, qtype, (O, I))
    assert supported(qw)
    x = torch.randn(3, I, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ qw.dequantize().double().t()
    y = convert(qw).linear(x)
    assert ((y.double() - ref).norm() / ref.norm()).item() < module.TOLERANCE


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_offloaded_equals_resident_bitwise(families, name, tmp_path):
    d, _ = families[name]
    path = write_gguf(d, tmp_path / "q.gguf", experts=T.Q4_K if name == "mixtral" else T.Q8_0, attention=T.Q8_0)
    resident = offload_moe.load(path, Placement(cpu_experts="none"), device="cpu", dtype="float32")
    offloaded = offload_moe.load(path, Placement(cache_slots=2, cpu_experts="none"), device="cpu", dtype="float32")
    assert torch.equal(resident.logits(IDS), offloaded.logits(IDS))
    a = resident.generate(IDS[0].tolist(), max_new_tokens=4, temperature=0, ignore_eos=True).token_ids
    b = offloaded.generate(IDS[0].tolist(), max_new_tokens=4, temperature=0, ignore_eos=True).token_ids
    assert a == b


def test_mixed_types_across_layers_share_one_packed_form(families, tmp_path):
    """Q4_K_M keeps some layers' ffn_down at Q6_K: one slot layout must hold both, exactly."""
    d, _ = families["mixtral"]
    q4 = write_gguf(d, tmp_path / "q4.gguf", experts=T.Q4_K)
    q6 = write_gguf(d, tmp_path / "q6.gguf", experts=T.Q6_K)
    r4, r6 = gguf.GGUFReader(q4), gguf.GGUFReader(q6)
    w = gguf.GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    for key, field in r4.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, field.contents(), field.types[0]) if field.types[0] != gguf.GGUFValueType.ARRAY \
                else w.add_array(key, field.contents())
    for t4, t6 in zip(r4.tensors, r6.tensors):
        t = t6 if t4.name == "blk.1.ffn_down_exps.weight" else t4
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ckpt = GGUFCheckpoint(tmp_path / "mixed.gguf")
    for layer in (0, 1):
        t = ckpt.tensors[f"blk.{layer}.ffn_down_exps.weight"]
        reference = gguf.quants.dequantize(np.array(t.data), T(t.type))[3]
        w2 = ckpt.expert(layer, 3)["w2"]
        assert (w2.bits, w2.group_size) == (8, 16)
        assert np.abs(w2.dequantize().numpy() - reference).max() <= 2.0**-10 * np.abs(reference).max()
    m = offload_moe.load(tmp_path / "mixed.gguf", Placement(cache_slots=2), device="cpu")
    assert torch.isfinite(m.logits(IDS)).all()


# ---------------------------------------------------------------- tokenizer, chat, plan, info

@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-gguf") / "demo-Q8_0.gguf"
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return write_gguf(DEMO_DIR, out, experts=T.Q8_0, attention=T.Q8_0, embeddings=T.Q8_0, chat_template=template)


def test_tokenizer_from_the_header_equals_tokenizer_json(demo_gguf):
    ours = open_tokenizer(GGUFCheckpoint(demo_gguf))
    reference = Tokenizer(DEMO_DIR)
    assert ours.encode(MIXED_TEXT) == reference.encode(MIXED_TEXT)
    assert ours.decode(ours.encode(MIXED_TEXT)) == reference.decode(reference.encode(MIXED_TEXT))


def test_a_lone_gguf_chats_with_its_own_template(demo_gguf, tmp_path):
    lone = tmp_path / "lone" / demo_gguf.name  # nothing beside it
    lone.parent.mkdir()
    lone.write_bytes(demo_gguf.read_bytes())
    model = offload_moe.load(lone, device="cpu")
    prompt = model.tokenizer.render_chat([{"role": "user", "content": "Hello"}])
    assert prompt == "<|user|>Hello\n<|assistant|>"
    out = subprocess.run([sys.executable, "-m", "offload_moe", "chat", "--model", str(lone), "--device", "cpu",
                          "--temperature", "0", "--max-new-tokens", "4"], input="Hello\n", capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = model.generate(model.tokenizer.encode(prompt, add_special_tokens=False), max_new_tokens=4,
                              temperature=0).text
    assert expected.strip() and expected.strip() in out.stdout


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "offload_moe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_plan_and_info_read_the_header(demo_gguf):
    out = _cli("plan", demo_gguf, "--profile", "12gb")
    assert out.returncode == 0, out.stderr
    assert "int8" in out.stdout  # the file's own widths, not the profile's
    info = _cli("info", demo_gguf)
    assert info.returncode == 0, info.stderr
    assert "mixtral" in info.stdout and "Q8_0" in info.stdout


# ---------------------------------------------------------------- bad input

def _one_line_error(path, *needles, commands=("info", "plan")):
    """`offload-moe info PATH` and `plan PATH` exit non-zero with one line naming the file and the fault."""
    import contextlib
    import io

    from offload_moe.cli.main import main

    for command in commands:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([command, str(path), *(["--profile", "12gb"] if command == "plan" else [])])
        lines = err.getvalue().strip().splitlines()
        assert code != 0 and len(lines) == 1, err.getvalue()
        for n in needles:
            assert n in lines[0], lines[0]


def test_wrong_magic(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + bytes(60))
    _one_line_error(p, str(p), "not a GGUF file")


def test_unsupported_version(families, tmp_path):
    p = write_gguf(families["mixtral"][0], tmp_path / "v.gguf", version=99)
    _one_line_error(p, str(p), "version 99")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated(families, tmp_path, keep):
    p = write_gguf(families["mixtral"][0], tmp_path / "t.gguf")
    data = p.read_bytes()
    p.write_bytes(data[:int(len(data) * keep)])
    _one_line_error(p, str(p), "truncated")


def test_truncated_header(families, tmp_path):
    p = write_gguf(families["mixtral"][0], tmp_path / "h.gguf")
    p.write_bytes(p.read_bytes()[:300])
    _one_line_error(p, str(p))


def test_unknown_ggml_type_number(families, tmp_path):
    p = write_gguf(families["mixtral"][0], tmp_path / "u.gguf")
    r = gguf.GGUFReader(p, "r+")
    r.tensors[3].field.parts[4][0] = 99  # the tensor's ggml type
    r.data.flush()
    del r
    _one_line_error(p, str(p), "ggml type 99")


def test_split_sets_load_as_one_file(families, tmp_path):
    d, model = families["mixtral"]
    first = write_gguf(d, tmp_path / "s.gguf", experts=T.Q8_0, split_max_tensors=10)
    files = sorted(tmp_path.glob("s-*-of-*.gguf"))
    assert len(files) > 2 and first == files[0]
    whole = write_gguf(d, tmp_path / "whole.gguf", experts=T.Q8_0)
    assert torch.equal(_logits(files[1], IDS), _logits(whole, IDS))  # any shard names the set
    files[-1].unlink()
    _one_line_error(first, files[-1].name, "missing")


def test_unknown_architecture(tmp_path):
    p = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(p), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(p, str(p), "'bert'", "not supported")


def test_unknown_tensor_type_is_named(families, tmp_path):
    """IQ4_NL has no exact packed form: refused with the tensor and its type, accepted with requantize."""
    d, _ = families["mixtral"]
    p = write_gguf(d, tmp_path / "f.gguf")
    r = gguf.GGUFReader(p)
    out = tmp_path / "iq4.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    for key, field in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, field.contents(), field.types[0]) if field.types[0] != gguf.GGUFValueType.ARRAY \
                else w.add_array(key, field.contents())
    for t in r.tensors:
        if t.name.endswith("ffn_up_exps.weight"):
            bs, ts = gguf.GGML_QUANT_SIZES[T.IQ4_NL]
            shape = tuple(reversed(t.shape.tolist()))
            raw = np.random.default_rng(0).integers(0, 256, (*shape[:-1], shape[-1] // bs * ts), dtype=np.uint8)
            raw.reshape(-1, ts)[:, :2] = np.full((raw.size // ts, 1), 0.01, np.float16).view(np.uint8)
            w.add_tensor(t.name, raw, raw_dtype=T.IQ4_NL)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(out, "ffn_up_exps.weight", "IQ4_NL", "--requantize", commands=("info",))  # plan: header only
    ckpt = GGUFCheckpoint(out, requantize="int8")
    t = ckpt.tensors["blk.0.ffn_up_exps.weight"]
    reference = gguf.quants.dequantize(np.array(t.data), T.IQ4_NL)[2]
    w3 = ckpt.expert(0, 2)["w3"]
    assert w3.bits == 8  # requantized RTN int8, group 32: close, not exact
    assert np.abs(w3.dequantize().numpy() - reference).max() <= np.abs(reference).max() / 100
    with pytest.raises(OffloadMoeError, match="IQ4_NL"):
        offload_moe.load(out, device="cpu")


def test_quantize_takes_a_gguf_source(demo_gguf, tmp_path):
    """An F32 GGUF quantizes to the same tensors as the checkpoint it came from; a Q8_0 one is
    dequantized first, and the copy keeps the file's tokenizer and chat template."""
    from safetensors.torch import load_file

    from offload_moe.tools.convert import quantize

    f32 = write_gguf(DEMO_DIR, tmp_path / "demo-f32.gguf")
    settings = dict(experts="int4", attention="int8", embeddings="bf16", group_size=32, method="rtn", device="cpu")
    a = quantize(f32, tmp_path / "from-gguf", **settings)
    b = quantize(DEMO_DIR, tmp_path / "from-dir", **settings)
    for shard in sorted(b.glob("*.safetensors")):
        ta, tb = load_file(a / shard.name), load_file(shard)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in tb)
    c = quantize(demo_gguf, tmp_path / "from-q8", **settings)
    model = offload_moe.load(c, device="cpu")
    assert model.tokenizer.encode(MIXED_TEXT) == Tokenizer(DEMO_DIR).encode(MIXED_TEXT)
    assert model.tokenizer.render_chat([{"role": "user", "content": "Hi"}]) == "<|user|>Hi\n<|assistant|>"


def test_sentencepiece_vocabulary_from_the_header(tmp_path):
    """Tokens and scores (tokenizer.ggml.model = llama): pieces by score, a leading U+2581, byte
    fallback for characters that are no piece; decoding gives the text back. (Against llama-tokenize:
    test_gguf_llamacpp.py.)"""
    from gguf_fixtures import gguf_tokenizer, write_spm_vocab

    tok = gguf_tokenizer(write_spm_vocab(tmp_path / "spm.gguf", MIXED_TEXT))
    ids = tok.encode(MIXED_TEXT)
    assert ids[0] == 1 and tok.decode(ids) == MIXED_TEXT
    pieces = [tok.backend.id_to_token(i) for i in tok.encode("Juliet 東", add_special_tokens=False)]
    assert "".join(pieces[:-3]) == "\u2581Juliet\u2581" and pieces[-3:] == ["<0xE6>", "<0x9D>", "<0xB1>"]
