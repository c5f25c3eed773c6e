"""A GGUF file computed where it lies (issue 25): weights are views of the file's mapping, so opening a
multi-GB file grows anonymous memory by a bounded amount (no per-expert copy at load); the source file
is the disk tier (nothing written under offload_dir), and every tier computes bit for bit what the
resident views compute."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_fixtures import T, tiny_mixtral_gguf

import offload_moe
from offload_moe.checkpoints.gguf import GGUFCheckpoint
from offload_moe.kernels.ggml import GGMLWeight
from offload_moe import Placement

IDS = [1, 17, 42, 5, 66, 23, 9, 31]
ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    """A tiny Mixtral as a Q8_0 GGUF."""
    return tiny_mixtral_gguf(tmp_path_factory, "q8.gguf", T.Q8_0)


def _rss_anon() -> int:
    """Anonymous resident bytes of this process (RssAnon in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


def grown_sparse(src: Path, out: Path, experts: int, ffn: int) -> Path:
    """`src` with `experts` experts of width `ffn` per layer: the same metadata and small tensors, the
    expert tensors (and routers) as holes of a sparse file (zero blocks: valid Q8_0, weight 0). Written
    in milliseconds whatever the size."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out), arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = {f"{arch}.expert_count": experts, f"{arch}.feed_forward_length": ffn}.get(key, field.contents())
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, field.types[0])
    big, small = {}, {}
    for t in r.tensors:
        shape = tuple(reversed(t.shape.tolist()))  # torch order
        if "_exps" in t.name:
            shape = (experts, ffn, shape[2]) if "down" not in t.name else (experts, shape[1], ffn)
        elif "ffn_gate_inp" in t.name:
            shape = (experts, shape[1])
        else:
            small[t.name] = np.array(t.data)
        bs, ts = gguf.GGML_QUANT_SIZES[t.tensor_type]
        nbytes = int(np.prod(shape)) // bs * ts
        big[t.name] = nbytes
        byte_shape = (*shape[:-1], shape[-1] // bs * ts)
        w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    start = -(-w.fout[0].tell() // ALIGN) * ALIGN
    w.close()
    total = start + sum(-(-n // ALIGN) * ALIGN for n in big.values())
    with open(out, "r+b") as f:
        f.truncate(total)  # a hole: reads as zeros, takes no disk
    rw = gguf.GGUFReader(out, "r+")
    for t in rw.tensors:
        if t.name in small:
            t.data[...] = small[t.name].reshape(t.data.shape)
    rw.data.flush()
    del rw
    return out


def test_every_cpu_weight_is_a_view_of_the_mapping(q8_file):
    ckpt = GGUFCheckpoint(q8_file)
    t = ckpt.tensors["blk.0.ffn_up_exps.weight"]
    w3 = ckpt.expert_in_place(0, 5)["w3"]
    assert isinstance(w3, GGMLWeight) and w3.ggml_type == T.Q8_0
    per = t.nbytes // t.shape[0]
    assert w3.data.data_ptr() == t.data.ctypes.data + 5 * per  # expert 5 is the 5th byte range
    embed = ckpt.get_weight("model.embed_tokens.weight", None, in_place=True)
    assert isinstance(embed, GGMLWeight)  # the token table stays Q8_0, read row by row
    ref = gguf.quants.dequantize(np.array(ckpt.tensors["token_embd.weight"].data), T.Q8_0)
    ids = torch.tensor([[3, 90, 3]])
    from offload_moe.kernels.modules import QEmbedding

    assert torch.equal(QEmbedding(embed, torch.float32)(ids)[0], torch.from_numpy(ref[[3, 90, 3]]))
    model = offload_moe.load(q8_file, device="cpu", dtype="float32")
    assert model.settings.weights == "mapped"


def test_opening_a_multi_gb_file_grows_anonymous_memory_by_little(q8_file, tmp_path):
    """64 experts of width 13440 in 3 layers: a 2.1 GB file. Loading it must not copy experts: RssAnon
    grows by less than 96 MiB (the small tensors, the KV cache, Python objects), under 5% of the file."""
    big = grown_sparse(q8_file, tmp_path / "big.gguf", experts=64, ffn=13440)
    size = big.stat().st_size
    assert size > 2e9
    before = _rss_anon()
    model = offload_moe.load(big, Placement(context_length=64), device="cpu", dtype="float32")
    grown = _rss_anon() - before
    assert grown < 96 * 2**20, f"RssAnon grew by {grown / 2**20:.0f} MiB opening a {size / 1e9:.1f} GB file"
    assert torch.isfinite(model.logits(torch.tensor([IDS[:2]]))).all()


@pytest.mark.parametrize("offload,prefetch", [("ram", 0), ("disk", 1), ("disk", 2)])
def test_the_source_file_is_the_disk_tier(q8_file, tmp_path, offload, prefetch):
    """cache_slots on a CPU run: misses are preads of the file's byte ranges into the slots; nothing is
    written under offload_dir, and the greedy tokens and logits are the resident run's, bit for bit."""
    resident = offload_moe.load(q8_file, device="cpu", dtype="float32")
    offload_dir = tmp_path / "offload"
    offload_dir.mkdir()
    cached = offload_moe.load(q8_file,
                              Placement(cache_slots=2, prefetch=prefetch, offload=offload, offload_dir=offload_dir),
                              device="cpu", dtype="float32")
    assert cached.settings.offload == "file" and list(offload_dir.iterdir()) == []
    ids = torch.tensor([IDS])
    assert torch.equal(resident.logits(ids), cached.logits(ids))
    a = resident.generate(IDS, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    b = cached.generate(IDS, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    assert a == b
    stats = cached.experts.stats()
    assert stats["misses"] > 0 and all(n > 0 for n in stats["bytes_read_per_layer"])
    assert sum(stats["bytes_read_per_layer"]) == stats["bytes_moved"]


def test_our_header_parser_reads_what_the_gguf_package_reads(q8_file):
    """reader.py (struct over the mapping, bounded, ~1 s on a real vocabulary where GGUFReader takes
    ~25 s) against gguf.GGUFReader: every key's value, every tensor's offset, type, shape and bytes."""
    from offload_moe.checkpoints.gguf.reader import GGUFFile

    ours, theirs = GGUFFile(q8_file), gguf.GGUFReader(q8_file)
    assert len(ours.tensors) == len(theirs.tensors)
    for b in theirs.tensors:
        a = ours.tensors[b.name]
        assert (a.type, a.offset) == (int(b.tensor_type), int(b.data_offset))
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
    keys = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert keys.keys() == ours.fields.keys()
    for k, v in keys.items():
        assert ours.fields[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), k


def test_a_mapped_plan_sizes_experts_by_the_files_own_blocks(q8_file):
    """The planner sizes a GGUF's experts by their ggml blocks (Q8_0: 34 bytes per 32 weights), so a
    plan's bytes per expert, and the bytes a token reads, are what the file holds."""
    from offload_moe.placement.planner import plan
    from offload_moe.placement.profiles import load_profile

    ckpt = GGUFCheckpoint(q8_file)
    p = plan(ckpt.config, load_profile("cpu"), mapped=True, ram_available=2**34)
    one = sum(n for _, _, n in ckpt.expert_ranges(0, 0).values())
    assert p.bytes_per_expert == one and p.mapped


def test_plan_says_what_each_token_reads_from_the_file_and_how_fast(q8_file, tmp_path):
    """`offload-moe plan FILE.gguf` under a CPU profile too small for every expert: weights as file
    pages, a RAM expert cache of the slots that fit, and the bytes a token reads at the rate measured
    on the file itself."""
    import contextlib
    import io

    from offload_moe.cli.main import main

    toml = tmp_path / "small.toml"
    toml.write_text('device = "cpu"\nvram_budget = 0\nreserve = "1MB"\ncontext_length = 64\ncache_slots = "auto"\n'
                    'prefetch = 1\noffload = "ram"\nram_budget = "2.4MB"\n\n[bits]\nexperts = "int8"\n'
                    'attention = "int8"\nembeddings = "int8"\n')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["plan", str(q8_file), "--profile", str(toml)])
    text = " ".join(out.getvalue().split())
    assert code == 0, text
    assert "mapped from the file" in text and "read from disk per token" in text and "measured" in text


def test_a_file_truncated_after_loading_is_one_clear_error(q8_file, tmp_path):
    """The file tier reads at use: a file cut short behind our back is an OffloadMoeError naming it,
    not a crash (SIGBUS) or garbage."""
    from offload_moe import OffloadMoeError

    copy = tmp_path / "q8.gguf"
    copy.write_bytes(q8_file.read_bytes())
    model = offload_moe.load(copy, Placement(cache_slots=1, prefetch=0), device="cpu", dtype="float32")
    ckpt = GGUFCheckpoint(copy)
    first = min(r[1] for r in ckpt.expert_ranges(0, 0).values())
    with open(copy, "r+b") as f:
        f.truncate(first)  # every expert gone; the small tensors before them stay mapped
    with pytest.raises(OffloadMoeError, match="past the end of the file"):
        model.generate(IDS, max_new_tokens=2, temperature=0, ignore_eos=True)


def test_rotating_neighbours_of_permuted_rows_is_the_rotation_of_halves():
    """`apply_rope_adjacent` on q/k rows in llama.cpp's order (each head (2, d/2) -> (d/2, 2), as its
    converter writes a Mixtral) is `apply_rope` on the original rows, permuted the same way, bit for bit."""
    from gguf_fixtures import llama_permute

    from offload_moe.model.attention import apply_rope, apply_rope_adjacent

    heads, T_, d = 3, 5, 16
    x = torch.randn(1, heads, T_, d, generator=torch.Generator().manual_seed(0))        # (B, heads, T, d)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.arange(T_).float()[:, None] * inv[None]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()  # (T, d)

    def permuted(t):  # the head dims of (B, heads, T, d) in llama.cpp's order
        return torch.from_numpy(llama_permute(t.permute(0, 1, 3, 2).reshape(heads * d, -1).numpy(), heads)) \
            .reshape(1, heads, d, T_).permute(0, 1, 3, 2)

    assert torch.equal(apply_rope_adjacent(permuted(x), cos, sin), permuted(apply_rope(x, cos, sin)))


def test_a_mixtral_gguf_computes_q_and_k_in_the_files_order(tmp_path):
    """Mixtral's q/k rows are used where they lie (views of the mapping, no un-permuted copy) and
    rotated as llama.cpp rotates them; prefill logits and greedy decode (the C decode step) match
    transformers on the same weights."""
    from conftest import tiny_mixtral
    from gguf_fixtures import write_gguf

    hf = tiny_mixtral(hidden_size=64, intermediate_size=64)
    hf.save_pretrained(tmp_path / "hf")
    path = write_gguf(tmp_path / "hf", tmp_path / "m.gguf")                       # F32, q/k permuted
    ckpt = GGUFCheckpoint(path)
    q = ckpt.get_weight("model.layers.1.self_attn.q_proj.weight", None, in_place=True)
    assert q.data_ptr() == ckpt.tensors["blk.1.attn_q.weight"].data.ctypes.data     # the file's bytes
    model = offload_moe.load(path, device="cpu", dtype="float32")
    assert model.settings.weights == "mapped" and model.transformer.config.rope_pairs == "adjacent"
    ids = torch.tensor([IDS])
    with torch.no_grad():
        expected = hf(ids).logits
        seq = list(IDS)
        for _ in range(8):                                                        # greedy, past end of text
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        theirs = seq[len(IDS):]
    assert (model.logits(ids) - expected).abs().max().item() < 1e-4
    assert model.generate(IDS, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids == theirs


def test_a_file_bigger_than_ram_maps(q8_file, tmp_path):
    """A GGUF larger than RAM + swap opens: the mapping reserves no commit charge (a private writable
    mapping is refused with ENOMEM by the kernel's default overcommit heuristic), and an expert at its
    far end reads from it (a sparse file: written in milliseconds, no disk taken)."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    ram = (int(meminfo["MemTotal"].split()[0]) + int(meminfo["SwapTotal"].split()[0])) * 1024
    per_layer = 1.3 * ram / 3                                   # 3 layers of gate, up, down (Q8_0: 34 bytes / 32)
    ffn = int(per_layer / (3 * 64 * 256 * 34 / 32)) // 32 * 32
    big = grown_sparse(q8_file, tmp_path / "big.gguf", experts=64, ffn=ffn)
    assert big.stat().st_size > ram
    ckpt = GGUFCheckpoint(big)
    w2 = ckpt.expert_in_place(ckpt.config.num_layers - 1, 63)["w2"]
    assert w2.data.data_ptr() + w2.data.numel() <= ckpt.tensors["blk.2.ffn_down_exps.weight"].data.ctypes.data \
        + ckpt.tensors["blk.2.ffn_down_exps.weight"].nbytes
    assert int(w2.data[-1].sum()) == 0                          # a hole reads as zeros


@pytest.fixture(scope="module")
def f16_file(tmp_path_factory):
    """A tiny Mixtral whose experts are F16 in the file (the rest F32)."""
    from conftest import tiny_mixtral
    from gguf_fixtures import write_gguf

    d = tmp_path_factory.mktemp("hf16")
    tiny_mixtral(hidden_size=64, intermediate_size=64).save_pretrained(d)
    return write_gguf(d, tmp_path_factory.mktemp("gguf16") / "f16.gguf", experts=T.F16)


def test_experts_stored_in_the_compute_dtype_are_read_as_the_files_bytes(f16_file, q8_file):
    """Where a file stores the experts in the compute dtype, their bytes are the form a device
    computes (a CUDA run fills its host tier and slots from the mapping, and the file is its disk
    tier): an expert is one range per matrix, and a read of it is the mapped bytes."""
    from offload_moe.model.expert_interface import ExpertWeights
    from offload_moe.experts.layout import ExpertLayout
    from offload_moe.experts.source import SourceStore, source_fields

    ckpt = GGUFCheckpoint(f16_file)
    assert ckpt.experts_stored_as(torch.float16) and not ckpt.experts_stored_as(torch.bfloat16)
    assert not GGUFCheckpoint(q8_file).experts_stored_as(torch.float32)      # blocks: converted for a GPU
    layout = ExpertLayout(ExpertWeights(**ckpt.expert_in_place(0, 0)))
    assert source_fields(layout, ckpt.expert_ranges(0, 0))
    store = SourceStore(layout, lambda layer: ckpt.expert_ranges(layer, 0), ckpt.config.num_layers,
                        ckpt.config.num_experts)
    slot = torch.empty(layout.nbytes, dtype=torch.uint8)
    store.read_into(2, 5, slot)
    store.close()
    read, mapped = layout.view(slot), ckpt.expert_in_place(2, 5)
    assert all(torch.equal(getattr(read, m), mapped[m]) for m in ("w1", "w3", "w2"))
    assert mapped["w1"].dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the slots fill through pinned staging)")
def test_a_cuda_run_streams_float_experts_from_the_file(f16_file, tmp_path):
    """offload='disk' on CUDA with F16 experts in float16: the file is the disk tier (nothing under
    offload_dir) and logits equal the all-resident run's bit for bit."""
    resident = offload_moe.load(f16_file, Placement(cache_slots="all"), device="cuda", dtype="float16")
    offload_dir = tmp_path / "offload"
    offload_dir.mkdir()
    streamed = offload_moe.load(f16_file,
                                Placement(cache_slots=2, offload="disk", offload_dir=offload_dir, cpu_experts="none"),
                                device="cuda", dtype="float16")
    assert streamed.settings.offload == "file" and list(offload_dir.iterdir()) == []
    ids = torch.tensor([IDS])
    assert torch.equal(resident.logits(ids), streamed.logits(ids))


def test_a_plan_that_streams_experts_from_the_file_reads_ahead(q8_file):
    """When the experts do not fit and stream from the file, the plan reads the guessed experts of
    the next FILE_PREFETCH layers ahead on the I/O thread (the cpu profile's prefetch 0 is for RAM
    tiers, whose copies would share the cores); when every expert is mapped, nothing changes."""
    from dataclasses import replace

    from offload_moe.placement.planner import FILE_PREFETCH, plan
    from offload_moe.placement.profiles import load_profile

    cfg, cpu = GGUFCheckpoint(q8_file).config, load_profile("cpu")
    assert cpu.prefetch == 0
    small = plan(cfg, replace(cpu, ram_budget=2_400_000, reserve=1_000_000, context_length=64), mapped=True)
    roomy = plan(cfg, cpu, mapped=True, ram_available=2**34)
    assert small.slots_per_layer and small.profile.prefetch == FILE_PREFETCH >= 1
    assert not roomy.slots_per_layer and roomy.profile.prefetch == 0
