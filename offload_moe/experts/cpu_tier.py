"""Experts computed on the CPU, where they sit in host RAM, instead of being copied to the device.

Chosen by `load(..., cpu_experts=...)`:

- "auto" (the default): "all" on a CPU device with every expert resident; otherwise "none" (always
  copy). The hybrid is not chosen automatically on CUDA until it has been measured on a GPU (it
  converts experts at load and holds a second CPU form): ask for it with "hybrid".
- "hybrid" (offloaded experts only): the expert cache decides per miss whether to copy the expert
  into a slot or have the CPU compute it from its `CpuTier` form (see `ExpertCache.fetch` and
  `experts/costs.py`, measured by `experts/cost_timing.py`), on CUDA and on the CPU alike (tests, comparisons).
- "all": every expert stays in host RAM in CPU form and is computed there (llama.cpp's
  `-ot exps=CPU`); attention, norms and routers stay on the device.
- an int N: the first N MoE layers' experts are computed on the CPU, the others are resident or
  offloaded as `cache_slots` says (llama.cpp's `--n-cpu-moe N`).

The model needs no change for any of them: the provider hands it `interface.Expert`s, which
compute where their weights are and move the activations there and back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from ..base.errors import OffloadMoeError
from .cost_file import saved_costs
from .cost_timing import measure_costs
from .costs import CostModel
from .store import HostStore
from ..model.expert_interface import Expert, ExpertWeights
from .cpu_kernels import Int4Planes, converts, cpu_form, expert_format, owns_bytes, weight_nbytes

MODES = ("auto", "none", "hybrid", "all")


class CpuTier:
    """The experts the CPU may compute, per layer, in the form its kernels read.

    Float experts are views of the host tier's bytes (no second copy), and so are 4- and 8-bit
    ones where our kernel computes them (`quant/cpu_qmv.py`); otherwise quantized ones are
    converted once, held beside the host bytes (2/3-bit codes repacked to 4 bits; torch's int4
    layout: as large at 4 bits, 6% larger at 8). Layers without a CPU form are absent."""

    def __init__(self, layers: dict[int, list[ExpertWeights]]):
        self.layers = layers
        example = next(iter(layers.values()))[0]
        self.format = expert_format(example)
        self.nbytes = weight_nbytes(example)         # bytes one CPU forward reads

    def has(self, layer: int) -> bool:
        return layer in self.layers

    def weights(self, layer: int, expert: int) -> ExpertWeights:
        return self.layers[layer][expert]

    @property
    def extra_bytes(self) -> int:
        """Host RAM held in addition to the host tier (0 when the CPU reads the host tier's bytes)."""
        example = next(iter(self.layers.values()))[0]
        if not owns_bytes(example.w1):
            return 0
        return sum(len(experts) for experts in self.layers.values()) * self.nbytes

    @classmethod
    def build(cls, layers, num_experts: int, read: Callable[[int, int], ExpertWeights]) -> CpuTier:
        """CPU forms of `read(layer, e)` (host-tier views or freshly loaded experts) for `layers`."""
        return cls({layer: [cpu_form(read(layer, e)) for e in range(num_experts)] for layer in layers})


def hybrid_tier(store: HostStore, *, device: torch.device, dtype: torch.dtype, hidden: int,
                costs: CostModel | None = None, max_extra_bytes: int | None = None
                ) -> tuple[CpuTier | None, CostModel | None]:
    """The hybrid's CPU tier over the host tier's RAM layers (disk layers are always copied), and
    its cost model: `costs` as given, else the one saved for this machine, else measured now on
    layer 0's expert 0 (a second or so; one expert's worth of device memory, freed after).

    Quantized experts need their CPU form besides the host bytes; layers get one while that stays
    within `max_extra_bytes`. (None, None) when no layer gets one."""
    if store.ram_layers == 0:
        return None, None
    host = store.layout.view(store.ram[0][0])
    layers = range(store.ram_layers)
    if converts(host) and max_extra_bytes is not None:
        per_layer = store.num_experts * weight_nbytes(cpu_form(host))
        layers = range(min(store.ram_layers, max(0, max_extra_bytes) // per_layer))
    if not layers:
        return None, None
    tier = CpuTier.build(layers, store.num_experts, lambda layer, e: store.layout.view(store.ram[layer][e]))
    costs = costs or saved_costs(device, (tier.format, expert_format(host)))
    if costs is None:
        source = store.expert(0, 0)
        target = torch.empty(source.shape, dtype=source.dtype, device=device)
        costs = measure_costs(tier.weights(0, 0), store.layout.view(target), source, target, hidden=hidden,
                              dtype=dtype, source_name="measured at load")
        del target
        if device.type == "cuda":
            torch.cuda.empty_cache()  # once, at load: give the measurement's buffer back
    return tier, costs


class SplitByLayer:
    """The first `n` MoE layers' experts from `first`, the rest from `rest` (which numbers its
    layers from 0: layer n is its layer 0). Stats and trace are those of `rest`, plus the count."""

    def __init__(self, n: int, first, rest):
        self.n, self.first, self.rest = n, first, rest
        self.prefetch_depth = rest.prefetch_depth

    def fetch(self, layer: int, experts: list[int], tokens: int,
              guesses: Sequence[list[int]] = ()) -> Iterator[tuple[int, Expert]]:
        if layer < self.n:
            return self.first.fetch(layer, experts, tokens)
        return self.rest.fetch(layer - self.n, experts, tokens, guesses)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        if layer >= self.n:
            self.rest.prefetch(layer - self.n, experts)

    @property
    def trace(self):
        return getattr(self.rest, "trace", None)

    def stats(self) -> dict:
        return {**self.rest.stats(), "cpu_layers": self.n}

    def reset_stats(self) -> None:
        self.rest.reset_stats()


def cpu_layers(value, num_layers: int, device: torch.device, offloaded: bool) -> tuple[str, int]:
    """`cpu_experts` -> ("none" | "hybrid" | "layers", how many leading layers are on the CPU).

    "auto": on a CPU device with every expert resident, "all" (experts run through the CPU kernels,
    converted once at load); otherwise "none" — the per-expert hybrid is opted into with "hybrid"
    until it has been measured on a GPU (it converts experts at load and holds a second CPU form)."""
    if isinstance(value, bool) or not (value in MODES or isinstance(value, int)):
        raise OffloadMoeError(f"cpu_experts = {value!r}, expected 'auto', 'none', 'hybrid', 'all' "
                              f"or a number of layers 0..{num_layers}")
    if value == "auto":
        return ("layers", num_layers) if device.type == "cpu" and not offloaded else ("none", 0)
    if value == "hybrid":
        if not offloaded:
            raise OffloadMoeError("cpu_experts = 'hybrid' needs offloaded experts: set cache_slots to a "
                                  "number of slots per layer (with 'all' every expert is resident)")
        return "hybrid", 0
    if value == "none" or value == 0:
        return "none", 0
    if value == "all":
        return "layers", num_layers
    if not 0 <= value <= num_layers:
        raise OffloadMoeError(f"cpu_experts = {value}, expected a number of layers 0..{num_layers}")
    return "layers", value


__all__ = ["MODES", "CpuTier", "Int4Planes", "SplitByLayer", "converts", "cpu_form", "cpu_layers", "hybrid_tier"]
