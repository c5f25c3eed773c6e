"""bf16 matrices on the CPU, prepacked once into oneDNN's blocked layout.

Why: torch computes a bf16 `F.linear` on the CPU through oneDNN, which reorders the weight into
its blocked layout on every call; at batch 1 that reorder costs as much as the product, so a
decode step read bf16 weights at about half the speed it could (BENCHMARKS.md, "CPU kernels").
`PackedBF16` does the reorder once, at load (`mkldnn._reorder_linear_weight`; same bytes,
machine-specific, never persisted) and multiplies with `mkldnn._linear_pointwise`, the product
F.linear itself runs after its reorder: the results are bitwise those of F.linear, which
`packing_available()` checks once per process on a probe (and where they are not, or oneDNN is
missing, nothing is packed). So offloaded experts, computed with F.linear from slots, still equal
resident ones bit for bit.

Shape letters: N tokens, I in features, O out features.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


def _ops():
    mk = getattr(torch.ops, "mkldnn", None)
    return (getattr(mk, "_reorder_linear_weight", None), getattr(mk, "_linear_pointwise", None)) if mk else (None, None)


@functools.cache
def packing_available() -> bool:
    """Whether prepacked products are F.linear's, bit for bit, here (probe: two shapes, three batch sizes)."""
    reorder, pointwise = _ops()
    if reorder is None or pointwise is None or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    try:
        for O, I in ((48, 64), (96, 160)):
            w = torch.randn(O, I, generator=g).to(torch.bfloat16)
            packed = reorder(w, 1)
            for n in (1, 3, 17):
                x = torch.randn(n, I, generator=g).to(torch.bfloat16)
                if not torch.equal(pointwise(x, packed, None, "none", [], ""), F.linear(x, w)):
                    return False
    except RuntimeError:
        return False
    return True


def packable(w) -> bool:
    return (isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.dim() == 2
            and packing_available())


class PackedBF16:
    """A bf16 [O, I] CPU matrix in oneDNN's layout; `linear` is F.linear's result, bit for bit."""

    def __init__(self, w: torch.Tensor):
        self.shape = tuple(w.shape)
        self.packed = _ops()[0](w.contiguous(), 1)    # opaque [O, I]: readable only by the kernel
        self.nbytes = w.numel() * w.element_size()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., I] -> [..., O] in x's dtype (computed in bf16, as F.linear on the bf16 weight)."""
        O, I = self.shape
        y = _ops()[1](x.reshape(-1, I).to(torch.bfloat16), self.packed, bias, "none", [], "")  # (N, O)
        return y.to(x.dtype).view(*x.shape[:-1], O)


class PackedLinear(nn.Module):
    """`nn.Linear` over a `PackedBF16` weight (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.w = PackedBF16(linear.weight.detach())
        self.register_buffer("packed", self.w.packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise TypeError(f"PackedLinear computes bf16, got {x.dtype}")
        return self.w.linear(x, None if self.bias is None else self.bias.detach())


def pack_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Swap every bf16 CPU `nn.Linear` of `model` whose name does not end in one of `skip` (modules
    whose `.weight` is read directly, e.g. routers) for a `PackedLinear`. Returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and packable(module.weight) and not name.endswith(skip):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, PackedLinear(module))
            count += 1
    return count
