"""All experts resident on the compute device: the reference every offloaded run must equal."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from ..kernels.ggml import stacked_table
from ..model.expert_interface import Activation, Expert, ExpertWeights


class ResidentExperts:
    """Every expert's weights loaded once; `fetch` hands them out in the order asked. Weights held
    elsewhere than the compute device (the CPU computing some layers) run there (`Expert`)."""

    prefetch_depth = 0  # nothing to prefetch: resident experts need no guess of future routing
    stable = True       # what `fetch` hands out stays valid after the next expert is handed out
    stable_experts = True  # ... and after `fetch` ends (a decode step may run them in one call: `ggml.experts_one_token`)

    def __init__(self, load_expert: Callable[[int, int], ExpertWeights], num_layers: int, num_experts: int,
                 activation: Activation = Activation(), lazy: bool = False):
        """lazy: build each expert when it is first used (its weights are views of a mapped file, so
        there is nothing to read at load, and nothing per expert is done in Python before it is needed)."""
        self.load_expert, self.activation = load_expert, activation
        self.experts: list[list[Expert | None]] = [
            [None if lazy else Expert(load_expert(layer, e), activation) for e in range(num_experts)]
            for layer in range(num_layers)]
        self._tables: dict[int, object] = {}

    def _expert(self, layer: int, e: int) -> Expert:
        row = self.experts[layer]
        if row[e] is None:  # lazy: first use
            row[e] = Expert(self.load_expert(layer, e), self.activation)
        return row[e]

    def fetch(self, layer: int, experts: list[int], tokens: int,
              guesses: Sequence[list[int]] = ()) -> Iterator[tuple[int, Expert]]:
        for e in experts:
            yield e, self._expert(layer, e)

    def expert_table(self, layer: int):
        """The layer's experts as a decode step computes them in one C call (`kernels.ggml.stacked_table`:
        every expert a view of one stacked tensor per matrix, on the CPU), or None. Built once per layer
        from three experts."""
        if layer not in self._tables:
            E, table = len(self.experts[layer]), None
            if E >= 2 and self.activation == Activation():
                picks = [self._expert(layer, e).weights for e in (0, 1, E - 1)]
                if all(w.b1 is None and w.device.type == "cpu" for w in picks):
                    table = stacked_table([w.w1 for w in picks], [w.w3 for w in picks], [w.w2 for w in picks], E)
            self._tables[layer] = table
        return self._tables[layer]

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Everything is resident already."""

    def stats(self) -> dict:
        return {}

    def reset_stats(self) -> None:
        """No counters."""
