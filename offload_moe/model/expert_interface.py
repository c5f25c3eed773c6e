"""The seam between the model and the expert engine: what the model asks for, and what it gets.

The model routes its tokens, then asks its `ExpertProvider` for the experts they chose in one MoE
layer (`fetch`); in decode it also hands over its guesses of the next layers' experts (computed by
its own routers, or by a routing strategy it was given), so the provider can start copying them.
Data flows one way through this interface: the provider never calls back into the model.

What `fetch` yields is an `Expert`: one expert ready to run, `expert(h, tokens)` with h (N, H) the
layer's input on the compute device and tokens (n,) the rows that chose it (None: all of them),
returning (n, H) on
the compute device. Where the weights live elsewhere (an expert the CPU computes from host RAM),
the expert moves the activations itself; the model never knows. `ExpertWeights` holds the three
matrices of one SiLU-gated MLP in [out, in] form, each a plain tensor or a quantized weight
(anything with a `linear(x)` method); they may be views into one flat slot buffer the engine owns.

Shape letters: N tokens in the layer, n of them routed to one expert, H hidden size, I expert width.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from ..kernels.cpu_bf16 import bind_swiglu, small_linear, small_swiglu


def linear(x: torch.Tensor, w: Any) -> torch.Tensor:
    """x @ w.T for a plain [out, in] tensor or a quantized weight (bf16 on the CPU for a few tokens:
    our kernel, the same bits for a slot view and a resident tensor)."""
    if isinstance(w, torch.Tensor):
        y = small_linear(x, w) if x.device.type == "cpu" else None
        return F.linear(x, w) if y is None else y
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


class Activation(NamedTuple):
    """The expert MLP's activation, from `ModelConfig`: SiLU, or gpt-oss's clamped SwiGLU."""
    swiglu_limit: float | None = None
    alpha: float = 1.702


def bind_expert(w: ExpertWeights):
    """`x -> y or None`: the whole-expert kernel call `expert_forward` makes for these matrices
    (bf16 CPU tensors, or a packed CPU form with `bind_swiglu`), checked once; None if there is none."""
    if isinstance(w.w1, torch.Tensor):
        return bind_swiglu(w.w1, w.w3, w.w2) if w.w1.device.type == "cpu" else None
    bind = getattr(w.w1, "bind_swiglu", None)
    return bind(w.w3, w.w2) if bind is not None else None


def expert_forward(x: torch.Tensor, w: ExpertWeights, swiglu_limit: float | None = None,
                   alpha: float = 1.702) -> torch.Tensor:
    """SwiGLU expert: x [n, H] -> [n, H]. With `swiglu_limit`, gpt-oss's clamped variant:
    gate clamped above, up clamped to ±limit, (up + 1) · gate · sigmoid(alpha · gate)."""
    if w.b1 is None and swiglu_limit is None:
        # a packed CPU form, or bf16 CPU tensors, may compute the whole expert in one call
        if isinstance(w.w1, torch.Tensor):
            y = small_swiglu(x, w.w1, w.w3, w.w2) if x.device.type == "cpu" else None
        else:
            fused = getattr(w.w1, "swiglu", None)
            y = fused(x, w.w3, w.w2) if fused is not None else None
        return y if y is not None else linear(F.silu(linear(x, w.w1)) * linear(x, w.w3), w.w2)
    gate, up = linear(x, w.w1), linear(x, w.w3)  # (n, I)
    if w.b1 is not None:
        gate, up = gate + w.b1, up + w.b3
    if swiglu_limit is None:
        h = F.silu(gate) * up
    else:
        gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
        h = (up + 1) * gate * torch.sigmoid(gate * alpha)
    y = linear(h, w.w2)
    return y if w.b2 is None else y + w.b2


class Expert:
    """One expert ready to run: `expert(h, tokens)` -> (n, H) on h's device. Built once per slot
    or resident expert, never per token. Weights on another device (the CPU tier with a CUDA model)
    get the tokens moved there and the result moved back."""

    __slots__ = ("weights", "activation", "device", "fused", "entry")

    def __init__(self, weights: ExpertWeights, activation: Activation = Activation()):
        self.weights, self.activation, self.device = weights, activation, weights.device
        # the one-call CPU kernel `expert_forward` would pick, bound once (None: expert_forward decides)
        self.fused = bind_expert(weights) if activation == Activation() and weights.b1 is None else None
        # that kernel as C calls it (function address, fixed-argument block address, token limit), for a
        # decode step that gathers the expert's rows in C (`decode_cpu.ExpertRows`); None: no such entry
        self.entry = getattr(self.fused, "entry", None)

    def __call__(self, h: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        x = h if tokens is None else h[tokens]                         # (n, H); None: every row
        if self.device == h.device:
            y = self.fused(x) if self.fused is not None else None
            return y if y is not None else expert_forward(x, self.weights, *self.activation)
        return expert_forward(x.to(self.device), self.weights, *self.activation).to(h.device)


class ExpertProvider(Protocol):
    """Where the model gets its routed experts (the all-resident reference, the offloading cache)."""

    prefetch_depth: int   # how many MoE layers ahead it wants guesses for (0: none); decode only
    # optional `stable = True`: an Expert handed out stays valid while later ones are (no slot reuse
    # within a layer), so the model may hold them all and compute them in one call
    # optional `expert_table(layer)`: the layer's experts as C computes them where they lie (a
    # `kernels.native.ExpertTableArgs`), or None; a provider offering one has nothing to do per fetch
    # (no counters, no prefetch), so a CPU decode step may route and compute the layer in one C call

    def fetch(self, layer: int, experts: list[int], tokens: int,
              guesses: Sequence[list[int]] = ()) -> Iterator[tuple[int, Expert]]:
        """Every expert in `experts` (distinct ids of MoE layer `layer`, dense layers not counted)
        exactly once, in an order of the provider's choosing (resident ones first). `tokens`: how
        many tokens the layer computes. `guesses[j]`: expert ids layer + 1 + j will probably use;
        the provider may prefetch them at a moment of its choosing (after queueing this layer's
        hits) and must stay exact whatever they are."""
        ...

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start bringing `experts` of `layer` closer; a hint, never needed for correctness."""
        ...

    def stats(self) -> dict:
        """Counters (hits, misses, bytes moved, copy and stall seconds...); {} when there are none."""
        ...

    def reset_stats(self) -> None:
        ...
