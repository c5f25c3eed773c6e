"""Counts, on a model run on the CPU, the operations that would make a CUDA device wait for the host.

On CUDA a host sync is any operation whose result the host needs before it can queue more work:
reading values into Python (`.item()`, `.tolist()`, `int()`/`float()`/`bool()` of a tensor), copying
device memory into host memory (`.cpu()`, a copy into a host buffer), and operations whose output
shape depends on the data (`nonzero`, `unique`, `masked_select`, `bincount`, indexing with a boolean
mask, `torch.equal`). On a CPU-only machine none of them waits for anything, so `SyncCounter`
counts what would sync: every tensor of the model counts as "on the device" except the host-side
buffers the code keeps there by design (the pinned routing-ids buffer) and what is computed from
host-side tensors alone or brought to the host by `.cpu()`; an operation above counts when it
reads a device-side tensor.

Two torch modes do the watching: a `TorchFunctionMode` sees the Python-level reads that never reach
the dispatcher on the CPU (`.tolist()`, `.numpy()`, `.cpu()`), a `TorchDispatchMode` sees the aten
operations (`_local_scalar_dense` behind `.item()` and the scalar conversions, the data-dependent
ones, writes into a host buffer). Each counted sync is kept with the line of offload_moe that made it.

What it cannot see: a `.to(device)` in a CPU model cannot be told from a move between two device
tensors (code that means the host writes `.cpu()`); copies a CUDA-only branch makes (the hybrid's
activation copies to and from a CPU-computed expert) do not run on the CPU; C kernels read their
CPU tensors through pointers (they run on the CPU only). A tensor made from Python data with an
explicit `device=` counts (a host-to-device copy from pageable memory waits on CUDA).
"""

from __future__ import annotations

import traceback
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import offload_moe

aten = torch.ops.aten
PACKAGE = str(Path(offload_moe.__file__).parent)

# aten operations whose output shape depends on the values: on CUDA the host waits for them
DATA_DEPENDENT = {aten.nonzero, aten.masked_select, aten.bincount, aten._unique, aten._unique2, aten.unique_dim,
                  aten.unique_consecutive, aten.equal}
MASK_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}   # a boolean index: nonzero
HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy}


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts (an op's arguments or results)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = tree.values()
    elif not isinstance(tree, (tuple, list)):
        return []
    return [t for item in tree for t in _tensors(item)]


class SyncCounter:
    """`with SyncCounter(host_buffers) as syncs:` ... `syncs.count`, `syncs.where` (one line each).

    host_buffers: tensors kept in host memory by design (their storage, and every view of it, is
    host-side). Use `reset()` between steps."""

    def __init__(self, host_buffers: Iterable[torch.Tensor] = ()):
        self.host_storages = {b.untyped_storage().data_ptr() for b in host_buffers}
        self._derived: dict[int, weakref.ref] = {}   # host-side results, by id (tensors compare by value)
        self.where: list[str] = []
        self._modes = (_FunctionMode(self), _DispatchMode(self))

    @property
    def count(self) -> int:
        return len(self.where)

    def reset(self) -> list[str]:
        """The syncs counted so far (then none)."""
        where, self.where = self.where, []
        return where

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    # ---- host-side or device-side ----
    def is_host(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu":
            return False
        ref = self._derived.get(id(t))
        if ref is not None and ref() is t:
            return True
        try:
            return t.untyped_storage().data_ptr() in self.host_storages
        except NotImplementedError:   # no storage to look at (an opaque packed weight): on the device
            return False

    def mark_host(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._derived[id(t)] = weakref.ref(t, lambda _, key=id(t): self._derived.pop(key, None))

    def sync(self, what: str) -> None:
        """Count one sync, with the innermost offload_moe line that made it."""
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
        at = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        self.where.append(f"{what} at {at}")


class _FunctionMode(TorchFunctionMode):
    """Python-level reads of a device-side tensor that never reach the dispatcher on the CPU."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if func in HOST_READS and not c.is_host(args[0]):
            c.sync(f"{func.__name__}()")
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu:
            if not c.is_host(args[0]):
                c.sync("cpu()")
            c.mark_host([out])
        elif func in (torch.tensor, torch.as_tensor):
            if kwargs.get("device") is not None:
                c.sync(f"{func.__name__}(..., device=) from Python data")
            else:
                c.mark_host(_tensors(out))
        return out


class _DispatchMode(TorchDispatchMode):
    """aten operations that read device-side values on the host, or write them into a host buffer."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c, packet = self.counter, func.overloadpacket
        written = _written(func, args, kwargs)
        inputs = [t for t in _tensors((args, kwargs)) if not any(t is w for w in written)]
        on_device = [t for t in inputs if not c.is_host(t)]
        if packet is aten._local_scalar_dense and on_device:
            c.sync("a Python number from a tensor (item/int/float/bool)")
        elif packet in DATA_DEPENDENT and on_device:
            c.sync(f"{packet.__name__} (data-dependent shape)")
        elif packet in MASK_INDEXED and any(t.dtype in (torch.bool, torch.uint8) for t in on_device):
            c.sync(f"{packet.__name__} with a boolean mask (data-dependent shape)")
        elif on_device and any(c.is_host(w) for w in written):
            c.sync(f"{packet.__name__} of device data into a host buffer")
        out = func(*args, **kwargs)
        if inputs and not on_device:
            c.mark_host(t for t in _tensors(out) if not any(t is w for w in written))
        return out


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors `func` writes into (in-place self, out=), by its schema."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out += _tensors(args[i] if i < len(args) else kwargs.get(arg.name))
    return out
