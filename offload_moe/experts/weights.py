"""What the model receives for one expert, and the expert MLP math.

An `ExpertWeights` holds the three matrices of one SiLU-gated MLP in [out, in] form, each either a
plain tensor or a quantized weight (anything with a `linear(x)` method). They may be views into one
flat slot buffer owned by the expert cache; the model never allocates or frees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w: Any) -> torch.Tensor:
    """x @ w.T for a plain [out, in] tensor or a quantized weight."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    return w.linear(x)


@dataclass
class ExpertWeights:
    w1: Any   # gate projection [I, H]
    w3: Any   # up projection   [I, H]
    w2: Any   # down projection [H, I]

    @property
    def device(self) -> torch.device:
        w = self.w1
        return w.device if isinstance(w, torch.Tensor) else w.packed.device


def expert_forward(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """SwiGLU expert: x [N, H] -> [N, H]."""
    return linear(F.silu(linear(x, w.w1)) * linear(x, w.w3), w.w2)
