"""The offloading engine against the all-resident run, a reference LRU, and broken inputs."""

import os
import stat

from pathlib import Path

import pytest
import torch

import offload_moe
from offload_moe import OffloadMoeError
from offload_moe.experts.policy import LRU, Belady, simulate
from offload_moe import Placement

PROMPT = [1, 17, 42, 5, 66, 23, 9]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], device="cpu")
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    tokens = model.generate(PROMPT, max_new_tokens=64, temperature=0, ignore_eos=True).token_ids
    return ids, model.logits(ids), tokens


@pytest.mark.parametrize("offload", ["ram", "disk"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("slots", range(1, 9))
def test_offloaded_equals_resident_bitwise(tiny_checkpoint, reference, tmp_path, slots, prefetch, offload):
    ids, logits, tokens = reference
    model = offload_moe.load(tiny_checkpoint[0],
                             Placement(cache_slots=slots, prefetch=prefetch, offload=offload, offload_dir=tmp_path),
                             device="cpu")
    assert torch.equal(model.logits(ids), logits)
    out = model.generate(PROMPT, max_new_tokens=64, temperature=0, ignore_eos=True)
    assert out.token_ids == tokens
    assert model.stats["experts"]["misses"] > 0 or slots == 8


def test_mixed_tiers_and_per_layer_slots_equal_resident(tiny_checkpoint, reference, tmp_path):
    ids, logits, tokens = reference
    layer_bytes = 8 * 3 * 32 * 48 * 4  # 8 experts, three fp32 [48, 32] matrices, 64-byte aligned already
    model = offload_moe.load(tiny_checkpoint[0],
                             Placement(cache_slots=[1, 3, 2], ram_budget=layer_bytes, offload_dir=tmp_path),
                             device="cpu")
    assert model.settings.ram_layers == 1 and model.settings.disk_layers == 2
    assert model.generate(PROMPT, max_new_tokens=64, temperature=0, ignore_eos=True).token_ids == tokens
    assert torch.equal(model.logits(ids), logits)


def reference_lru(trace, slots):
    """A plain list-based LRU with the engine's rules: hits first, then misses evict the least
    recently used expert not still needed in this step."""
    cache, hits, misses = [], 0, 0  # most recent last
    for needed in trace:
        needed = sorted(set(needed))
        waiting = set(needed)
        step_misses = [e for e in needed if e not in cache]
        for e in needed:
            if e in cache:
                hits += 1
                cache.remove(e)
                cache.append(e)
                waiting.discard(e)
        for e in step_misses:
            misses += 1
            if len(cache) >= slots:
                cache.remove(next(x for x in cache if x not in waiting))
            cache.append(e)
            waiting.discard(e)
    return hits, misses


@pytest.mark.parametrize("slots", [1, 2, 3, 5])
def test_hits_and_misses_equal_reference_lru(tiny_checkpoint, slots):
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=slots, prefetch=0, record_trace=True),
                             device="cpu")
    model.generate(PROMPT, max_new_tokens=48, temperature=0.9, seed=4, ignore_eos=True)
    per_layer = model.stats["experts"]["per_layer"]
    for layer, trace in enumerate(model.experts.trace):
        assert len(trace) == 48  # prefill + 47 decode steps
        assert (per_layer[layer]["hits"], per_layer[layer]["misses"]) == reference_lru(trace, slots)
        assert simulate(trace, slots, LRU()) == reference_lru(trace, slots)
        belady_hits, _ = simulate(trace, slots, Belady(trace))
        assert belady_hits >= per_layer[layer]["hits"]


def test_belady_is_optimal_on_a_known_trace():
    trace = [[0], [1], [2], [0], [1], [3], [0], [1], [2], [3]]
    assert simulate(trace, 2, LRU()) == (0, 10)   # LRU thrashes on a cycle longer than the cache
    # Belady by hand: t2 evicts 1 (next use t4 > t3), t3 hit 0, t4 evicts 2, t5 evicts 1, t6 hit 0,
    # t7 evicts 0 (never used again), t8 evicts 1 (never again), t9 hit 3.
    assert simulate(trace, 2, Belady(trace)) == (3, 7)


def test_prefetch_is_counted_and_used(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, prefetch=1), device="cpu")
    model.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True)
    s = model.stats["experts"]
    assert 0 < s["prefetch_used"] <= s["prefetch_issued"]
    assert s["bytes_moved"] == (s["misses"] + s["prefetch_issued"]) * s["bytes_per_expert"]


def test_ram_budget_smaller_than_one_layer(tiny_checkpoint):
    with pytest.raises(OffloadMoeError, match="smaller than one layer's experts"):
        offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, ram_budget="10KB"), device="cpu")


def test_unwritable_offload_dir(tiny_checkpoint, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user who can write anywhere (root): permissions cannot be tested")
    with pytest.raises(OffloadMoeError, match="not writable"):
        offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, offload="disk", offload_dir=locked),
                         device="cpu")


def test_offload_dir_that_is_a_file(tiny_checkpoint, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(OffloadMoeError, match="not writable"):
        offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, offload="disk", offload_dir=file),
                         device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "rewrite", "truncate_and_regrow"])
def test_disk_tier_file_changed_after_writing(tiny_checkpoint, tmp_path, damage):
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=1, offload="disk", offload_dir=tmp_path),
                             device="cpu")
    victim = Path(model.settings.offload_dir) / "layer-001.experts"
    assert victim.parent.parent == tmp_path  # a private subdirectory of the offload_dir
    data, st = victim.read_bytes(), victim.stat()
    with open(victim, "r+b") as f:  # the same file (the one mapped), as a careless user would
        if damage == "truncate":
            f.truncate(100)
        elif damage == "rewrite":
            f.write(bytes(len(data)))
        else:
            f.truncate(100)
            f.truncate(len(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as they were (but truncate)
    with pytest.raises(OffloadMoeError, match="layer-001.experts") as e:
        model.generate(PROMPT, max_new_tokens=4, temperature=0)
    assert ("truncated" if damage == "truncate" else "changed") in str(e.value)


@pytest.mark.parametrize("value", [0, 9, "some", [1, 2], True])
def test_bad_cache_slots(tiny_checkpoint, value):
    with pytest.raises(OffloadMoeError, match="cache_slots"):
        offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=value), device="cpu")


@needs_cuda
@pytest.mark.parametrize("offload", ["ram", "disk"])
@pytest.mark.parametrize("prefetch", [0, 1])
@pytest.mark.parametrize("slots", [1, 2, 8])
def test_cuda_offloaded_equals_resident(tiny_checkpoint, tmp_path, slots, prefetch, offload):
    resident = offload_moe.load(tiny_checkpoint[0], device="cuda")
    model = offload_moe.load(tiny_checkpoint[0],
                             Placement(cache_slots=slots, prefetch=prefetch, offload=offload, offload_dir=tmp_path),
                             device="cuda")
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.logits(ids), resident.logits(ids))
    expected = resident.generate(PROMPT, max_new_tokens=64, temperature=0, ignore_eos=True).token_ids
    assert model.generate(PROMPT, max_new_tokens=64, temperature=0, ignore_eos=True).token_ids == expected


@needs_cuda
def test_cuda_decode_allocates_no_new_memory(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, prefetch=1), device="cuda")
    model.generate(PROMPT, max_new_tokens=8, temperature=0, ignore_eos=True)  # warm the caching allocator
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    model.generate(PROMPT, max_new_tokens=64, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    assert after["segment.all.allocated"] == before["segment.all.allocated"]  # no new cudaMalloc
    assert after["reserved_bytes.all.peak"] == before["reserved_bytes.all.peak"]


def test_no_reuse_policy_misses_every_use(tiny_checkpoint, reference):
    _, _, tokens = reference
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=8, prefetch=0, policy="none"), device="cpu")
    assert model.generate(PROMPT, max_new_tokens=64, temperature=0, ignore_eos=True).token_ids == tokens
    s = model.stats["experts"]
    assert s["hits"] == 0 and s["misses"] > 0
    assert s["bytes_moved"] == s["misses"] * s["bytes_per_expert"]
