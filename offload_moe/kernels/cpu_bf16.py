"""bf16 matrices on the CPU: our kernel for a few tokens (`bf16mv.c`), else oneDNN.

Where our library is built (`native.load("bmv")`), a bf16 weight stays as stored and a product of
up to `BMV_MAX_TOKENS` tokens runs in `bf16mv.c`, which reads the weight once at close to memory
bandwidth (BENCHMARKS.md, "bf16 decode"); longer inputs go to F.linear. The kernel's sum order
depends only on the shape, so an expert in a cache slot and the same expert resident agree bit for
bit (both go through `small_linear` / `small_swiglu`). Projections of one input (q, k, v) share one
concatenated weight (`fuse_bf16`), computed in one call. bf16 products are exact in fp32, so the
kernel's error against float64 math is that of fp32 sums, then one rounding.

Without the library, matrices are prepacked once into oneDNN's blocked layout:
torch computes a bf16 `F.linear` on the CPU through oneDNN, which reorders the weight into
its blocked layout on every call; at batch 1 that reorder costs as much as the product, so a
decode step read bf16 weights at about half the speed it could (BENCHMARKS.md, "CPU kernels").
`PackedBF16` does the reorder once, at load (`mkldnn._reorder_linear_weight`; same bytes,
machine-specific, never persisted) and multiplies with `mkldnn._linear_pointwise`, the product
F.linear itself runs after its reorder: the results are bitwise those of F.linear, which
`packing_available()` checks once per process on a probe (and where they are not, or oneDNN is
missing, nothing is packed). So offloaded experts, computed with F.linear from slots, still equal
resident ones bit for bit.

Shape letters: N tokens, I in features, O out features, H hidden, F expert width.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native

BMV_MAX_TOKENS = 3   # tokens up to which our kernel beats F.linear on a Mixtral-size matrix (scripts/cpu_kernel_bench.py; BENCHMARKS.md)


def _bmv():
    return native.load("bmv")


def kernel_name() -> str:
    """What computes bf16 CPU products of a few tokens here: "bf16mv (AVX-512 BF16)", or oneDNN and why."""
    return f"bf16mv ({native.status('bmv')})" if _bmv() is not None else f"oneDNN (bf16mv {native.status('bmv')})"


def bmv_available() -> bool:
    """Whether our bf16 kernel is built here (then bf16 weights stay in their stored layout)."""
    return _bmv() is not None


def _takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous())


def small_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [..., I] @ w.T for bf16 x and a bf16 [O, I] CPU weight, by our kernel when x has at most
    BMV_MAX_TOKENS rows; None otherwise (or without the library)."""
    O, I = w.shape[0], w.shape[-1]
    n = x.numel() // I if x.shape[-1] == I else 0
    if not 0 < n <= BMV_MAX_TOKENS or not _takes(x, w) or (lib := _bmv()) is None:
        return None
    xs = x.reshape(n, I)
    if not xs.is_contiguous():
        xs = xs.contiguous()
    y = torch.empty(*x.shape[:-1], O, dtype=torch.bfloat16)
    if lib.bmv(xs.data_ptr(), y.data_ptr(), 1, n, O, I, w.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError(f"bmv: no scratch for {n} x {I} activations")
    return y


class BF16Swiglu:
    """`small_swiglu` for one expert's fixed matrices, checked once: per call only x is looked at."""

    def __init__(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
        self.hidden = w1.shape[1]
        self._at = native.BmvSwigluArgs(w1.shape[1], w1.shape[0], w1.data_ptr(), w3.data_ptr(), w2.data_ptr())
        self.weights = (w1, w3, w2)   # kept alive with the pointers
        self._call = _bmv().bmv_swiglu_p

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        H = self.hidden
        if x.dtype != torch.bfloat16 or x.dim() != 2 or not 0 < x.shape[0] <= BMV_MAX_TOKENS or x.shape[1] != H \
                or x.device.type != "cpu" or not x.is_contiguous():
            return None
        n = x.shape[0]
        y = torch.empty(n, H, dtype=torch.bfloat16)
        if self._call(x.data_ptr(), y.data_ptr(), 1, n, self._at, torch.get_num_threads()) != 0:
            raise MemoryError(f"bmv: no scratch for a {n}-token expert")
        return y


def bind_swiglu(w1, w3, w2) -> BF16Swiglu | None:
    """A bound whole-expert call where `small_swiglu` would take these matrices, else None."""
    probe = torch.empty(1, w1.shape[1] if isinstance(w1, torch.Tensor) else 0, dtype=torch.bfloat16)
    if not all(isinstance(w, torch.Tensor) for w in (w1, w3, w2)) or w3.shape != w1.shape \
            or w2.shape != (w1.shape[1], w1.shape[0]) or not all(_takes(probe, w) for w in (w1, w3, w2)) \
            or _bmv() is None:
        return None
    return BF16Swiglu(w1, w3, w2)


def small_swiglu(x: torch.Tensor, w1, w3, w2) -> torch.Tensor | None:
    """silu(x @ w1.T) * (x @ w3.T) @ w2.T in one call of our kernel (x (n, H) bf16, n <= BMV_MAX_TOKENS;
    w1, w3 [F, H] and w2 [H, F] bf16 CPU tensors), else None."""
    if not all(isinstance(w, torch.Tensor) for w in (w1, w3, w2)) or x.dim() != 2:
        return None
    F_, H = w1.shape
    n = x.shape[0]
    if (not 0 < n <= BMV_MAX_TOKENS or x.shape[1] != H or w3.shape != w1.shape or w2.shape != (H, F_)
            or not (_takes(x, w1) and _takes(x, w3) and _takes(x, w2)) or (lib := _bmv()) is None):
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty(n, H, dtype=torch.bfloat16)
    if lib.bmv_swiglu(x.data_ptr(), y.data_ptr(), 1, n, H, F_, w1.data_ptr(), w3.data_ptr(), w2.data_ptr(),
                      torch.get_num_threads()) != 0:
        raise MemoryError(f"bmv: no scratch for a {n}-token expert")
    return y


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


class BF16Linear(nn.Module):
    """`nn.Linear` over a bf16 CPU weight kept as stored: our kernel for a few tokens, else F.linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = small_linear(x, self.weight)
        if y is None:
            return F.linear(x, self.weight, self.bias)
        return y if self.bias is None else y + self.bias


class BF16Group:
    """Linears of one input (attention's q, k, v) over one concatenated weight, computed in one call;
    each module's weight becomes a view of it (no second copy)."""

    def __init__(self, modules: list[BF16Linear]):
        with torch.no_grad():
            self.weight = torch.cat([m.weight.detach() for m in modules])           # [sum O, I]
            at = 0
            for m in modules:
                rows = m.weight.shape[0]
                m.weight = nn.Parameter(self.weight[at:at + rows], requires_grad=False)
                at += rows

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        y = small_linear(x, self.weight)
        return F.linear(x, self.weight) if y is None else y


def fuse_bf16(modules: list[nn.Module]) -> BF16Group | None:
    """One call for several bias-free `BF16Linear`s of the same input width, else None."""
    if not all(isinstance(m, BF16Linear) and m.bias is None for m in modules) or \
            len({m.weight.shape[1] for m in modules}) != 1:
        return None
    return BF16Group(modules)


def pack_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Swap every bf16 CPU `nn.Linear` of `model` whose name does not end in one of `skip` (modules
    whose `.weight` is read directly, e.g. routers) for a `BF16Linear` (our kernel built) or a
    `PackedLinear`. Returns how many."""
    count = 0
    ours = _bmv() is not None
    for name, module in list(model.named_modules()):
        w = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or name.endswith(skip) or not isinstance(w, torch.Tensor) \
                or w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.dim() != 2:
            continue
        if ours:
            swapped = BF16Linear(module)
        elif packable(w):
            swapped = PackedLinear(module)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, swapped)
        count += 1
    return count
