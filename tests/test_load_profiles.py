"""`load(profile=...)`: profiles choose placement through the planner; kwargs override keys."""

import pytest
import torch

import offload_moe
from offload_moe import OffloadMoeError
from offload_moe import Placement

PROMPT = [1, 17, 42, 5, 66, 23, 9]


def test_auto_picks_the_cpu_profile_without_a_gpu(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto picks a GPU profile")
    model = offload_moe.load(tiny_checkpoint[0])
    assert model.settings.profile == "cpu" and model.settings.experts == "cpu"  # resident, CPU kernels
    assert model.context_length == 128  # the cpu profile's 4096 capped at the model's 128 positions


def test_gpu_profile_on_a_cpu_device_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(OffloadMoeError, match="'12gb' is for a CUDA GPU"):
        offload_moe.load(tiny_checkpoint[0], device="cpu", profile="12gb")


def test_user_profile_file_places_experts_on_disk(tiny_checkpoint, tmp_path):
    (tmp_path / "mine.toml").write_text(
        'device = "cpu"\nreserve = "1MB"\ncontext_length = 64\ncache_slots = "auto"\nprefetch = 0\n'
        'offload = "disk"\nram_budget = "1GB"\n[bits]\nexperts = "int4"\nattention = "int8"\nembeddings = "bf16"\n')
    resident = offload_moe.load(tiny_checkpoint[0], device="cpu", profile=None)
    model = offload_moe.load(tiny_checkpoint[0], Placement(offload_dir=tmp_path / "tier"), device="cpu",
                             profile=tmp_path / "mine.toml")
    assert model.settings.profile == "mine"
    assert model.settings.disk_layers == 3 and model.context_length == 64
    expected = resident.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert model.generate(PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids == expected


def test_keyword_arguments_override_the_profile(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=3, prefetch=2, context_length=50),
                             device="cpu", profile="cpu")
    assert model.settings.cache_slots == [3, 3, 3] and model.settings.prefetch == 2
    assert model.context_length == 50


def test_unknown_profile_lists_the_known_ones(tiny_checkpoint):
    with pytest.raises(OffloadMoeError, match=r"unknown profile 'huge'.*12gb"):
        offload_moe.load(tiny_checkpoint[0], device="cpu", profile="huge")
