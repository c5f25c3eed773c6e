"""`offload_moe.quantize` / `offload-moe quantize`: streaming conversion to the quantized format.

Accuracy against the fp32 transformers model (test_logits_close_to_fp32). Tiny random Mixtral
(hidden 32, intermediate 48, 3 layers, 8 experts, top-2), group size 16, HQQ; the expert rows
quantize only the experts (attention and embeddings fp32); logits on `IDS` (1 x 24 tokens, seed 0);
both source layouts give identical numbers. Errors are relative: max|Δ| / max|ref| and
mean|Δ| / mean|ref| over all positions and the vocabulary.

    setting          measured max   measured mean   asserted max   asserted mean
    experts int8         1.36%           1.01%            2%             1.5%
    experts int4        42.6%           21.6%            60%            32%
    experts int3        60.6%           45.8%            85%            65%
    experts int2        91.3%           77.8%           130%           110%
    default mix*        93.5%           63.0%           130%            90%

    * experts int3, attention int4, embeddings bf16.

Why the low widths are loose: the model is random and its routing decisive, so a perturbed residual
stream flips some top-k choices, and a flipped route changes that token and, through attention,
every later one. On IDS int8 flips none (every position within 2%); it would on other inputs (a
second random row, seed 0, has one flip at position 1: 35% max error from there on), so the int8
row is tight for this fixed input only. Below int8 flips dominate and those rows bound gross
failure only (plus: mean error must grow as bits shrink). What pins every width exactly is the
oracle check beside it: transformers with the *dequantized* weights of the written checkpoint
reproduces our logits to 1e-4 (measured ≤ 2.2e-6).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import weakref
from pathlib import Path

import pytest
import torch

import offload_moe
from offload_moe import OffloadMoeError
from offload_moe.checkpoints.checkpoint import Checkpoint, read_header
from offload_moe.cli.main import main
from offload_moe.tools import convert
from offload_moe.kernels.format import QuantSpec, tensor_kind
from offload_moe.kernels.groupwise import QuantizedWeight, nbytes_for
from offload_moe.kernels.pack import packed_cols
from offload_moe import Placement

GROUP = 16  # divides hidden 32 and intermediate 48 of the tiny model
IDS = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(0))
PROMPT = [1, 17, 42, 5, 66, 23]
FP32_REST = {"attention": "fp32", "embeddings": "fp32"}
DEFAULT_MIX = {"experts": "int3", "attention": "int4", "embeddings": "bf16"}
# experts setting -> (max relative error, mean relative error) allowed; see the module docstring
TOLERANCE = {"int8": (0.02, 0.015), "int4": (0.60, 0.32), "int3": (0.85, 0.65), "int2": (1.30, 1.10),
             "mixed": (1.30, 0.90)}
BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ST_DTYPE = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def quantized(src, dst, **kwargs) -> Path:
    return offload_moe.quantize(src, dst, group_size=kwargs.pop("group_size", GROUP), **kwargs)


def deq(w) -> torch.Tensor:
    return w.dequantize(torch.float32) if isinstance(w, QuantizedWeight) else w.float()


def dequantized_reference(model, dst):
    """transformers' model with every weight replaced by what `dst` stores, dequantized."""
    ref = copy.deepcopy(model)
    ckpt = Checkpoint(dst)
    sd = ref.state_dict()  # shares storage with the parameters
    with torch.no_grad():
        for name, shape in ckpt.expected_shapes().items():
            sd[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")].copy_(deq(ckpt.get_weight(name, shape)))
        for i in range(ckpt.config.num_layers):
            for e in range(ckpt.config.num_experts):
                x = {k: deq(v) for k, v in ckpt.expert(i, e).items()}
                sd[f"model.layers.{i}.mlp.experts.gate_up_proj"][e].copy_(torch.cat([x["w1"], x["w3"]]))
                sd[f"model.layers.{i}.mlp.experts.down_proj"][e].copy_(x["w2"])
    return ref


def rel_errors(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (logits - ref).abs()
    return d.max().item() / ref.abs().max().item(), d.mean().item() / ref.abs().mean().item()


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def fp32_logits(tiny_checkpoint):
    with torch.no_grad():
        return tiny_checkpoint[1](IDS).logits.float()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Quantize each (source, settings) once per module, and compute each resident load's logits once."""
    root, dirs, logits, tokens = tmp_path_factory.mktemp("quantized"), {}, {}, {}

    class Cache:
        @staticmethod
        def dst(src, **settings) -> Path:
            key = (str(src), tuple(sorted(settings.items())))
            if key not in dirs:
                dirs[key] = quantized(src, root / f"q{len(dirs)}", **settings)
            return dirs[key]

        @staticmethod
        def logits(dst) -> torch.Tensor:
            if dst not in logits:
                logits[dst] = offload_moe.load(dst, device="cpu").logits(IDS)
            return logits[dst]

        @staticmethod
        def tokens(dst) -> list[int]:
            if dst not in tokens:
                tokens[dst] = greedy(offload_moe.load(dst, device="cpu"))
            return tokens[dst]

    return Cache


def greedy(model) -> list[int]:
    return model.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids


def settings_for(experts: str) -> dict:
    return DEFAULT_MIX if experts == "mixed" else dict(experts=experts, **FP32_REST)


# ---------------------------------------------------------------- (a) accuracy and generation


# every width from the per-expert source; the fused source gives identical files (test_files_follow_the_format
# and test_experts_within_step_bound cover it at every width), so two widths suffice here
ACCURACY_CASES = [(e, "per_expert") for e in ("int8", "int4", "int3", "int2", "mixed")] + [("int8", "fused"),
                                                                                           ("mixed", "fused")]


@pytest.mark.parametrize("experts,layout", ACCURACY_CASES)
def test_logits_close_to_fp32(tiny_checkpoints, fp32_logits, cache, layout, experts):
    src, model = tiny_checkpoints[("base", layout)]
    dst = cache.dst(src, **settings_for(experts))
    logits = cache.logits(dst)
    # exact: transformers on the dequantized weights of the written checkpoint
    with torch.no_grad():
        oracle = dequantized_reference(model, dst)(IDS).logits
    assert (logits - oracle).abs().max().item() <= 1e-4
    # close: the fp32 original, within the documented tolerance
    max_rel, mean_rel = rel_errors(logits, fp32_logits)
    tol_max, tol_mean = TOLERANCE[experts]
    assert max_rel <= tol_max and mean_rel <= tol_mean, (experts, max_rel, mean_rel)
    if layout == "per_expert":
        out = cache.tokens(dst)
        assert len(out) == 12 and all(0 <= t < 96 for t in out)


def test_error_grows_as_bits_shrink(tiny_checkpoint, fp32_logits, cache):
    means = [rel_errors(cache.logits(cache.dst(tiny_checkpoint[0], **settings_for(e))), fp32_logits)[1]
             for e in ("int8", "int4", "int3", "int2")]
    assert means == sorted(means), means


def test_quantized_size_matches_the_format(tiny_checkpoint, cache):
    src = Checkpoint(tiny_checkpoint[0])
    dst = cache.dst(src.path, **DEFAULT_MIX)
    spec = QuantSpec(dict(DEFAULT_MIX), GROUP, "hqq")
    out = Checkpoint(dst)
    assert sum(i.nbytes for i in out.tensors.values()) == convert.output_bytes(src, spec)
    assert out.total_bytes() < 0.3 * src.total_bytes()  # fp32 source -> ~3-bit experts


# ---------------------------------------------------------------- (b) the written files follow format.py


FORMAT_CASES = [
    ("base", "per_expert", DEFAULT_MIX, GROUP),
    ("base", "fused", {"experts": "int2", "attention": "int8", "embeddings": "int4"}, GROUP),
    ("tied", "per_expert", {"experts": "int8", "attention": "fp16", "embeddings": "int3"}, 8),
    ("kv1_top1", "fused", {"experts": "bf16", "attention": "fp32", "embeddings": "fp16"}, 24),  # group unused
]


def expected_tensors(cfg, settings: dict, group: int) -> dict[str, tuple[str, tuple]]:
    """Independent of convert.py: every output tensor name -> (safetensors dtype, shape)."""
    H, I, V, E, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_experts, cfg.head_dim
    weights = {"model.embed_tokens.weight": ("embeddings", (V, H)), "model.norm.weight": (None, (H,))}
    if not cfg.tie_word_embeddings:
        weights["lm_head.weight"] = ("embeddings", (V, H))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        weights.update({p + "input_layernorm.weight": (None, (H,)), p + "post_attention_layernorm.weight": (None, (H,)),
                        p + "self_attn.q_proj.weight": ("attention", (cfg.num_heads * hd, H)),
                        p + "self_attn.k_proj.weight": ("attention", (cfg.num_kv_heads * hd, H)),
                        p + "self_attn.v_proj.weight": ("attention", (cfg.num_kv_heads * hd, H)),
                        p + "self_attn.o_proj.weight": ("attention", (H, cfg.num_heads * hd)),
                        p + "block_sparse_moe.gate.weight": (None, (E, H))})
        for e in range(E):
            for m, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
                weights[f"{p}block_sparse_moe.experts.{e}.{m}.weight"] = ("experts", shape)
    out = {}
    for name, (kind, shape) in weights.items():
        setting = settings.get(kind)
        if setting in BITS:
            prefix, (o, i) = name.removesuffix(".weight"), shape
            out[prefix + ".qweight"] = ("U8", (o, packed_cols(i, BITS[setting])))
            out[prefix + ".scales"] = ("F16", (o, i // group))
            out[prefix + ".zeros"] = ("F16", (o, i // group))
        else:
            out[name] = (ST_DTYPE[setting] if setting else "F32", shape)  # norms, routers: as stored (fp32)
    return out


@pytest.mark.parametrize("name,layout,settings,group", FORMAT_CASES)
def test_files_follow_the_format(tiny_checkpoints, tmp_path, name, layout, settings, group):
    src = tiny_checkpoints[(name, layout)][0]
    dst = quantized(src, tmp_path / "q", group_size=group, **settings)
    cfg = Checkpoint(src).config
    L = cfg.num_layers
    shards = [f"model-{k:05d}-of-{L + 1:05d}.safetensors" for k in range(1, L + 2)]
    assert sorted(p.name for p in dst.glob("*.safetensors")) == shards
    headers = {s: read_header(dst / s) for s in shards}
    found = {t: (info.dtype, info.shape) for h in headers.values() for t, info in h.items()}
    assert found == expected_tensors(cfg, settings, group)
    for shard, header in headers.items():  # one shard per layer, then embeddings / final norm / lm_head
        layers = {int(t.split(".")[2]) if t.startswith("model.layers.") else None for t in header}
        assert layers == ({shards.index(shard)} if shard != shards[-1] else {None})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {t: s for s, h in headers.items() for t in h}
    assert index["metadata"]["total_size"] == sum(i.nbytes for h in headers.values() for i in h.values())
    # nbytes of each quantized weight is what the format promises
    ckpt = Checkpoint(dst)
    spec = ckpt.quant
    for wname, shape in {**ckpt.expected_shapes(), **ckpt.expert_shapes()}.items():
        kind_bits = spec.bits(tensor_kind(wname))
        w = ckpt.get_weight(wname, shape)
        if kind_bits:
            assert isinstance(w, QuantizedWeight) and w.nbytes == nbytes_for(shape, kind_bits, group)
    # config.json: the source's, plus quantization_config
    raw_src = json.loads((Path(src) / "config.json").read_text())
    raw_dst = json.loads((dst / "config.json").read_text())
    assert raw_dst.pop("quantization_config") == {"quant_method": "offload_moe", "format_version": 1,
                                                   "group_size": group, "method": "hqq", **settings}
    assert raw_dst == raw_src
    assert (dst / "generation_config.json").read_bytes() == (Path(src) / "generation_config.json").read_bytes()
    assert leftovers(tmp_path) == []


def test_both_source_layouts_write_the_same_checkpoint(tiny_checkpoints, cache):
    from safetensors.torch import load_file

    a, b = (cache.dst(tiny_checkpoints[("base", layout)][0], **DEFAULT_MIX) for layout in ("per_expert", "fused"))
    for shard in sorted(p.name for p in a.glob("*.safetensors")):
        ta, tb = load_file(a / shard), load_file(b / shard)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), shard
    assert (a / "model.safetensors.index.json").read_text() == (b / "model.safetensors.index.json").read_text()


def test_tokenizer_files_are_copied(tiny_checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "src"
    src.mkdir()
    for f in Path(tiny_checkpoint[0]).iterdir():
        (src / f.name).symlink_to(f)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    extra = {"tokenizer_config.json": b'{"bos_token": "<s>", "eos_token": "</s>"}',
             "special_tokens_map.json": b'{"bos_token": "<s>"}', "tokenizer.model": bytes(range(256))}
    for f, data in extra.items():
        (src / f).write_bytes(data)
    dst = quantized(src, tmp_path / "q", **DEFAULT_MIX)
    for f in ("tokenizer.json", *extra, "generation_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes(), f
    model = offload_moe.load(dst)
    assert model.tokenizer is not None and isinstance(model.generate("w5 w7", max_new_tokens=3).text, str)


# ---------------------------------------------------------------- (c) every expert within the step bound


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("method", ["rtn", "hqq"])
@pytest.mark.parametrize("experts", ["int8", "int3", "int2"])
def test_experts_within_step_bound(tiny_checkpoints, tmp_path, layout, method, experts):
    src = Checkpoint(tiny_checkpoints[("base", layout)][0])
    out = Checkpoint(quantized(src.path, tmp_path / "q", experts=experts, method=method, **FP32_REST))
    qmax = 2 ** BITS[experts] - 1
    worst = 0.0
    for i in range(src.config.num_layers):
        for e in range(src.config.num_experts):
            a, b = src.expert(i, e), out.expert(i, e)
            for m in ("w1", "w3", "w2"):
                w, qw = a[m].double(), b[m]
                assert isinstance(qw, QuantizedWeight) and qw.shape == tuple(w.shape) and qw.bits == BITS[experts]
                s = qw.scales.double().repeat_interleave(GROUP, dim=1)  # [out, in]
                z = qw.zeros.double().repeat_interleave(GROUP, dim=1)
                err = (qw.dequantize(torch.float64) - w).abs()
                # half a step (plus fp16 rounding of scale and zero); HQQ may move the grid so that the
                # group's extremes fall outside it: those are clamped to the grid's end
                outside = (w - w.clamp((0 - z) * s, (qmax - z) * s)).abs()
                if method == "rtn":
                    assert outside.max().item() <= 2.0**-10 * s.max().item() * qmax
                bound = s * (0.5 + 2.0**-11 * (qmax + z.abs())) + outside + 1e-6 * w.abs() + 1e-12
                assert bool((err <= bound).all()), (i, e, m, (err - bound).max().item())
                worst = max(worst, (err / s).max().item())
    assert worst <= (0.5 + 1e-3 if method == "rtn" else 1.0), worst  # in steps


# ---------------------------------------------------------------- (d) through the offloading engine


@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_offloaded_equals_resident_bitwise(tiny_checkpoint, cache, tmp_path, offload):
    dst = cache.dst(tiny_checkpoint[0], **DEFAULT_MIX)
    offloaded = offload_moe.load(dst, Placement(cache_slots=2, offload=offload, offload_dir=tmp_path / "tier"),
                                 device="cpu")
    assert offloaded.settings.experts == "offloaded"
    assert torch.equal(offloaded.logits(IDS), cache.logits(dst))
    assert greedy(offloaded) == cache.tokens(dst)
    assert offloaded.stats["experts"]["misses"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_cuda_quantizes_like_the_cpu(tiny_checkpoint, cache, tmp_path):
    cpu = Checkpoint(cache.dst(tiny_checkpoint[0], **DEFAULT_MIX))
    gpu = Checkpoint(quantized(tiny_checkpoint[0], tmp_path / "q", device="cuda", **DEFAULT_MIX))
    for name, shape in {**cpu.expected_shapes(), **cpu.expert_shapes()}.items():
        a, b = cpu.get_weight(name, shape), gpu.get_weight(name, shape)
        if isinstance(a, QuantizedWeight):
            assert torch.equal(a.scales, b.scales), name  # min-max scales: exact on any device
            assert (a.codes() != b.codes()).double().mean().item() <= 0.01, name  # HQQ zeros may differ by an ulp
            assert (a.dequantize() - b.dequantize()).abs().max().item() <= 1.01 * a.scales.float().max().item()
        else:
            assert torch.equal(a, b), name


# ---------------------------------------------------------------- (e) streaming


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_streams_one_layer_at_a_time(tiny_checkpoints, tmp_path, monkeypatch, layout):
    src = tiny_checkpoints[("base", layout)][0]
    events = []  # ("read", layer, key) / ("write", shard)
    alive: dict[int, tuple[int | None, int]] = {}  # id -> (layer, bytes) of source tensors still in memory
    peaks = []  # at each read: (layers with live source tensors, live source bytes)

    def layer_of(name):
        return int(name.split(".")[2]) if name.startswith("model.layers.") else None

    def track(t, name, key):
        layer = layer_of(name)
        events.append(("read", layer, key))
        alive[id(t)] = (layer, t.numel() * t.element_size())
        weakref.finalize(t, alive.pop, id(t), None)
        peaks.append(({l for l, _ in alive.values()}, sum(n for _, n in alive.values())))
        return t

    get, get_row, save = Checkpoint.get, Checkpoint._get_row, convert.save_file
    monkeypatch.setattr(Checkpoint, "get", lambda self, name: track(get(self, name), name, name))
    monkeypatch.setattr(Checkpoint, "_get_row", lambda self, name, i: track(get_row(self, name, i), name, (name, i)))
    monkeypatch.setattr(convert, "save_file", lambda t, f, **kw: (events.append(("write", Path(f).name)),
                                                                   save(t, f, **kw))[1])
    reports = []
    quantized(src, tmp_path / "q", progress=lambda *a: reports.append(a), **DEFAULT_MIX)

    ckpt = Checkpoint(src)
    L = ckpt.config.num_layers
    reads = [e for e in events if e[0] == "read"]
    keys = [k for _, _, k in reads]
    assert len(keys) == len(set(keys))  # each source tensor (or fused expert row) read once
    want = set(ckpt.expected_shapes())
    if layout == "fused":
        want |= {(n, e) for n in ckpt.expert_shapes() for e in range(ckpt.config.num_experts)}
    else:
        want |= set(ckpt.expert_shapes())
    assert set(keys) == want
    # layers in order, each layer's shard written before the next layer is read, the rest last
    order = [("layer", i) for i in range(L)] + [("rest", None)]
    seen = []
    for ev in events:
        step = ("write", ev[1]) if ev[0] == "write" else (("layer", ev[1]) if ev[1] is not None else ("rest", None))
        if not seen or seen[-1] != step:
            seen.append(step)
    shards = [f"model-{k:05d}-of-{L + 1:05d}.safetensors" for k in range(1, L + 2)]
    assert seen == [x for pair in zip(order, [("write", s) for s in shards]) for x in pair]
    # memory: live source tensors never span two layers, and never exceed one layer's source bytes
    layer_bytes = max(sum(i.nbytes for n, i in ckpt.tensors.items() if layer_of(n) == layer) for layer in range(L))
    assert max(len(layers) for layers, _ in peaks) == 1
    assert max(n for _, n in peaks) <= layer_bytes
    # progress: bytes of the source, monotone, complete at the end
    total = sum(i.nbytes for i in ckpt.tensors.values())
    assert {r[0] for r in reports} == {"quantize"} and all(r[2] == total for r in reports)
    done = [r[1] for r in reports]
    assert done == sorted(done) and done[0] == 0 and done[-1] == total and len(done) > L * 8


# ---------------------------------------------------------------- (f) bad input, full disk, the CLI


@pytest.mark.parametrize("kwargs,needle", [
    ({"experts": "int5"}, (r"experts = 'int5' is not a known width \(expected one of int2, int3, int4, int8, "
                           r"bf16, fp16, fp32\)")),
    ({"attention": "q4_0"}, r"attention = 'q4_0' is not a known width"),
    ({"embeddings": "float8"}, r"embeddings = 'float8' is not a known width"),
    ({"method": "gptq"}, r"method = 'gptq' is not known \(expected one of rtn, hqq\)"),
    ({"group_size": 24}, r"group_size 24 does not divide hidden_size 32 .*--group-size 16"),
    ({"group_size": 32}, r"group_size 32 does not divide intermediate_size 48 .*--group-size 16"),
    ({"group_size": 0}, r"group_size = 0, expected a positive integer"),
    ({"group_size": True}, r"group_size = True, expected a positive integer"),
    ({"device": "tpu"}, r"device 'tpu' is not a device name"),
])
def test_bad_arguments(tiny_checkpoint, tmp_path, kwargs, needle):
    dst = tmp_path / "q"
    with pytest.raises(OffloadMoeError, match=needle) as info:
        offload_moe.quantize(tiny_checkpoint[0], dst, **kwargs)
    assert "\n" not in str(info.value)
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_group_size_only_has_to_divide_quantized_widths(tiny_checkpoint, tmp_path):
    # 32 does not divide intermediate_size 48, but experts are not quantized: only hidden 32 matters
    dst = offload_moe.quantize(tiny_checkpoint[0], tmp_path / "q", experts="bf16", group_size=32)
    assert Checkpoint(dst).quant.group_size == 32
    with pytest.raises(OffloadMoeError, match="does not divide intermediate_size 48"):
        offload_moe.quantize(tiny_checkpoint[0], tmp_path / "q2", experts="int8", attention="bf16", group_size=32)


def test_source_not_a_checkpoint_or_already_quantized(tiny_checkpoint, tmp_path):
    with pytest.raises(OffloadMoeError, match="no such checkpoint directory"):
        offload_moe.quantize(tmp_path / "missing", tmp_path / "q", group_size=GROUP)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OffloadMoeError, match="empty/config.json: not found"):
        offload_moe.quantize(tmp_path / "empty", tmp_path / "q", group_size=GROUP)
    once = quantized(tiny_checkpoint[0], tmp_path / "once", **DEFAULT_MIX)
    with pytest.raises(OffloadMoeError, match=r"once: already quantized \(experts=int3, attention=int4, "
                                              r"embeddings=bf16\); quantize the original"):
        quantized(once, tmp_path / "twice")
    assert not (tmp_path / "q").exists() and not (tmp_path / "twice").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("what", ["directory", "file", "symlink"])
def test_existing_destination_is_left_untouched(tiny_checkpoint, tmp_path, what):
    dst = tmp_path / "q"
    if what == "directory":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    elif what == "file":
        dst.write_text("mine")
    else:
        dst.symlink_to(tmp_path / "nowhere")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(OffloadMoeError, match=rf"{dst}: already exists; quantize never overwrites"):
        quantized(tiny_checkpoint[0], dst)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    if what == "directory":
        assert (dst / "keep.txt").read_text() == "mine"
    elif what == "file":
        assert dst.read_text() == "mine"


def enospc_on(monkeypatch, call: int):
    """Make the shard writer fail with ENOSPC on its `call`-th shard, after writing part of the file."""
    calls = []
    save = convert.save_file

    def failing(tensors, filename, **kw):
        calls.append(filename)
        if len(calls) == call:
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return save(tensors, filename, **kw)

    monkeypatch.setattr(convert, "save_file", failing)
    return calls


def test_disk_full_midway_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    calls = enospc_on(monkeypatch, 2)
    dst = tmp_path / "out" / "q"
    with pytest.raises(OffloadMoeError, match=r"^no space left on device while writing .*model-00002-of-00004"
                                              rf"\.safetensors; nothing was written to {dst}$"):
        quantized(tiny_checkpoint[0], dst)
    assert len(calls) == 2 and not dst.exists() and not dst.parent.exists()  # nor the parent it made


def test_disk_full_writing_config_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    write_text = Path.write_text

    def failing(self, data, *a, **kw):
        if self.name == "config.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", failing)
    dst = tmp_path / "q"
    with pytest.raises(OffloadMoeError, match=r"no space left on device while writing .*config\.json"):
        quantized(tiny_checkpoint[0], dst)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing(tiny_checkpoint, tmp_path):
    def stop(what, done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantized(tiny_checkpoint[0], tmp_path / "q", progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_cli_summary(tiny_checkpoint, tmp_path, capsys):
    dst = tmp_path / "q"
    assert main(["quantize", str(tiny_checkpoint[0]), str(dst), "--group-size", str(GROUP), "--method", "rtn",
                 "--experts", "int4", "--attention", "int8", "--embeddings", "fp16"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no terminal: no progress bar
    before, after = Checkpoint(tiny_checkpoint[0]).total_bytes(), Checkpoint(dst).total_bytes()
    assert out.count("\n") == 1 and out.startswith(f"{dst}: ") and "→" in out
    assert f"({before / after:.2f}x smaller" in out
    assert Checkpoint(dst).quant == QuantSpec({"experts": "int4", "attention": "int8", "embeddings": "fp16"},
                                              GROUP, "rtn")


@pytest.mark.parametrize("args,needle", [
    (["--experts", "int5"], "is not a known width"),
    (["--method", "awq"], "method = 'awq' is not known"),
    ([], "group_size 64 does not divide hidden_size 32"),
    (["--group-size", "16", "ENOSPC"], "no space left on device"),
    (["--group-size", "16", "EXISTS"], "already exists"),
])
def test_cli_errors_are_one_line_exit_1(tiny_checkpoint, tmp_path, monkeypatch, capsys, args, needle):
    dst = tmp_path / "q"
    exists = "EXISTS" in args
    if "ENOSPC" in args:
        enospc_on(monkeypatch, 1)
    if exists:
        dst.mkdir()
    args = [a for a in args if a not in ("ENOSPC", "EXISTS")]
    assert main(["quantize", str(tiny_checkpoint[0]), str(dst), *args]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("offload-moe: error: ") and needle in err
    assert leftovers(tmp_path) == [] and dst.exists() == exists


def test_attention_norms_are_never_quantized():
    from offload_moe.kernels.format import tensor_kind

    for name in ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight",
                 "model.layers.3.self_attn.kv_a_layernorm.weight", "model.layers.0.input_layernorm.weight"):
        assert tensor_kind(name) is None
    assert tensor_kind("model.layers.0.self_attn.q_proj.weight") == "attention"
