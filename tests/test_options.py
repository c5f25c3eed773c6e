"""`load()`'s placement is one frozen value: planned from a profile, given directly, or overridden
field by field by keyword arguments, with the same result either way."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import offload_moe
from offload_moe.options import Placement, from_profile


def test_a_placement_given_directly_loads_like_the_keywords(tiny_checkpoint):
    ids = torch.tensor([[3, 9, 27, 81, 5]])
    by_keywords = offload_moe.load(tiny_checkpoint[0], device="cpu", profile=None, cache_slots=2, prefetch=0)
    given = offload_moe.load(tiny_checkpoint[0], device="cpu", placement=Placement(cache_slots=2, prefetch=0))
    assert given.placement == by_keywords.placement == Placement(cache_slots=2, prefetch=0)
    assert given.settings == by_keywords.settings
    assert torch.equal(given.logits(ids), by_keywords.logits(ids))


def test_keywords_override_single_fields_of_the_plan(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], device="cpu", profile="cpu", context_length=64)
    planned = from_profile("cpu", model.config, torch.device("cpu"), torch.float32)
    same_ram = dict(ram_budget=None)  # "auto" budgets measure the free RAM, which moves between calls
    assert (dataclasses.replace(model.placement, **same_ram)
            == dataclasses.replace(planned, context_length=64, **same_ram) != dataclasses.replace(planned, **same_ram))
    assert model.settings.profile == planned.profile == "cpu"


def test_placement_is_frozen_and_names_its_fields():
    p = Placement(cache_slots=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.prefetch = 2
    assert p.override(prefetch=None, policy="none") == Placement(cache_slots=3, policy="none")
    with pytest.raises(TypeError, match="slots"):
        p.override(slots=2)


def test_model_settings_are_typed_and_print_as_before(tiny_checkpoint):
    """`Model.settings` is a frozen `ModelSettings`; its JSON form (transcripts, the chat model line)
    has the keys of the placement that applies and nothing else."""
    from offload_moe.model_settings import ModelSettings

    base = {"profile", "device", "dtype", "context_length", "cpu_experts", "cpu_layers", "experts", "sampling"}
    resident = offload_moe.load(tiny_checkpoint[0], device="cpu", profile=None)
    assert isinstance(resident.settings, ModelSettings) and resident.settings.experts == "cpu"  # on the CPU: all on the CPU kernels
    assert set(resident.settings.as_dict()) == base
    with pytest.raises(dataclasses.FrozenInstanceError):
        resident.settings.experts = "offloaded"
    offloaded = offload_moe.load(tiny_checkpoint[0], device="cpu", profile=None, cache_slots=2, prefetch=1)
    d = offloaded.settings.as_dict()
    assert set(d) == base | {"cache_slots", "prefetch", "policy", "ram_layers", "disk_layers", "offload_dir"}
    assert d["experts"] == "offloaded" and d["cache_slots"] == [2] * len(offloaded.config.moe_layers)
    assert d["prefetch"] == 1 and d["ram_layers"] == len(offloaded.config.moe_layers) and d["disk_layers"] == 0
