"""All experts resident on the compute device: the reference every offloaded run must equal."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .interface import ExpertWeights


class ResidentExperts:
    """Every expert's weights loaded once; `fetch` hands them out in the order asked."""

    def __init__(self, load_expert: Callable[[int, int], ExpertWeights], num_layers: int, num_experts: int):
        self.weights = [[load_expert(layer, e) for e in range(num_experts)] for layer in range(num_layers)]

    def fetch(self, layer: int, experts: list[int], residual: torch.Tensor) -> Iterator[tuple[int, ExpertWeights]]:
        for e in experts:
            yield e, self.weights[layer][e]

    def attach_router(self, guess: Callable) -> None:
        """Resident experts need no prediction of future routing."""

    def stats(self) -> dict:
        return {}
