"""`load()`'s placement is one frozen value: planned from a profile, its fields replaced by those a
given `Placement` sets, or given whole (profile=None) with the defaults for the rest; and no public
function takes more than 8 parameters except through such a typed value."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import offload_moe
from offload_moe.placement.options import Placement, from_profile


def test_a_placement_without_a_profile_is_the_whole_placement(tiny_checkpoint):
    ids = torch.tensor([[3, 9, 27, 81, 5]])
    given = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, prefetch=0), device="cpu", profile=None)
    spelled = offload_moe.load(tiny_checkpoint[0], device="cpu", profile=None,
                               placement=Placement(cache_slots=2, prefetch=0, offload="ram", policy="lru"))
    assert given.placement == spelled.placement == Placement(cache_slots=2, prefetch=0).filled()
    assert given.placement.policy == "lru" and given.placement.offload == "ram"  # the defaults filled in
    assert given.settings == spelled.settings
    assert torch.equal(given.logits(ids), spelled.logits(ids))
    with pytest.raises(TypeError, match="Placement"):
        offload_moe.load(tiny_checkpoint[0], {"cache_slots": 2}, device="cpu")


def test_a_placement_overrides_single_fields_of_the_plan(tiny_checkpoint):
    model = offload_moe.load(tiny_checkpoint[0], Placement(context_length=64), device="cpu", profile="cpu")
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
    from offload_moe.api.settings import ModelSettings

    base = {"profile", "device", "dtype", "context_length", "cpu_experts", "cpu_layers", "experts", "sampling"}
    resident = offload_moe.load(tiny_checkpoint[0], device="cpu", profile=None)
    assert isinstance(resident.settings, ModelSettings) and resident.settings.experts == "cpu"  # on the CPU: all on the CPU kernels
    assert set(resident.settings.as_dict()) == base
    with pytest.raises(dataclasses.FrozenInstanceError):
        resident.settings.experts = "offloaded"
    offloaded = offload_moe.load(tiny_checkpoint[0], Placement(cache_slots=2, prefetch=1), device="cpu",
                                 profile=None)
    d = offloaded.settings.as_dict()
    assert set(d) == base | {"cache_slots", "prefetch", "policy", "ram_layers", "disk_layers", "offload_dir"}
    assert d["experts"] == "offloaded" and d["cache_slots"] == [2] * len(offloaded.config.moe_layers)
    assert d["prefetch"] == 1 and d["ram_layers"] == len(offloaded.config.moe_layers) and d["disk_layers"] == 0


def public_functions():
    """(qualified name, parameter count) of every public function and method of the package."""
    import ast
    from pathlib import Path

    root = Path(offload_moe.__file__).parent
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.startswith("_"):
                for inner in ast.walk(node):
                    inner.private_owner = True
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or getattr(node, "private_owner", False):
                continue
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            if names and names[0] in ("self", "cls"):
                names = names[1:]
            if not node.name.startswith("_") or node.name == "__init__":
                yield f"{path.relative_to(root)}:{node.lineno} {node.name}", len(names)


def test_no_public_function_takes_more_than_eight_parameters():
    """Options travel as typed values (`Placement`, `BenchOptions`, `TuneOptions`, ...), not long keyword lists."""
    over = [f"{name} ({n})" for name, n in public_functions() if n > 8]
    assert not over, "more than 8 parameters: " + ", ".join(over)
