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
    b1: torch.Tensor | None = None   # biases [I], [I], [H] (gpt-oss); None in most families
    b3: torch.Tensor | None = None
    b2: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.w1.device  # a tensor, or a packed weight's own `device`


def expert_forward(x: torch.Tensor, w: ExpertWeights, swiglu_limit: float | None = None,
                   alpha: float = 1.702) -> torch.Tensor:
    """SwiGLU expert: x [N, H] -> [N, H]. With `swiglu_limit`, gpt-oss's clamped variant:
    gate clamped above, up clamped to ±limit, (up + 1) · gate · sigmoid(alpha · gate)."""
    if w.b1 is None and swiglu_limit is None:
        return linear(F.silu(linear(x, w.w1)) * linear(x, w.w3), w.w2)
    gate, up = linear(x, w.w1), linear(x, w.w3)  # (N, I)
    if w.b1 is not None:
        gate, up = gate + w.b1, up + w.b3
    if swiglu_limit is None:
        h = F.silu(gate) * up
    else:
        gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
        h = (up + 1) * gate * torch.sigmoid(gate * alpha)
    y = linear(h, w.w2)
    return y if w.b2 is None else y + w.b2
