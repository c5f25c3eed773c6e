"""One expert as one flat byte buffer, so moving it is a single copy.

Every expert of a model has the same set of tensors (w1, w3, w2 — or, quantized, their packed codes,
scales and zeros), so one `ExpertLayout` describes where each tensor sits in the buffer. Slots and
host copies are plain uint8 buffers; `view` turns one back into `ExpertWeights` without copying.
Offsets are 64-byte aligned so the views are aligned for vectorised kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..model.expert_interface import ExpertWeights

ALIGN = 64
MATRICES = ("w1", "w3", "w2")
BIASES = ("b1", "b3", "b2")   # present in some families only (gpt-oss)


@dataclass(frozen=True)
class Field:
    name: str            # e.g. "w1" or "w1.qweight"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def flatten(weights: ExpertWeights) -> dict[str, torch.Tensor]:
    """Named tensors of one expert; quantized matrices contribute their component tensors."""
    out = {}
    for m in MATRICES:
        w = getattr(weights, m)
        if isinstance(w, torch.Tensor):
            out[m] = w
        else:
            for k, t in w.tensors().items():
                out[f"{m}.{k}"] = t
    for b in BIASES:
        if getattr(weights, b) is not None:
            out[b] = getattr(weights, b)
    return out


class ExpertLayout:
    """Where each tensor of an expert lives inside its flat buffer."""

    def __init__(self, example: ExpertWeights):
        self.fields: list[Field] = []
        self.quant = {m: None if isinstance(getattr(example, m), torch.Tensor) else getattr(example, m)
                      for m in MATRICES}  # a quantized example carries bits/group/shape metadata
        offset = 0
        for name, t in flatten(example).items():
            self.fields.append(Field(name, t.dtype, tuple(t.shape), offset))
            offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        self.nbytes = offset

    def write(self, buffer: torch.Tensor, weights: ExpertWeights) -> None:
        """Copy an expert's tensors into a flat uint8 buffer of `nbytes`."""
        tensors = flatten(weights)
        for f in self.fields:
            t = tensors[f.name]
            if t.dtype != f.dtype or tuple(t.shape) != f.shape:
                raise ValueError(f"expert tensor {f.name}: {t.dtype} {list(t.shape)}, layout expects "
                                 f"{f.dtype} {list(f.shape)}")
            buffer[f.offset:f.offset + f.nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))

    def view(self, buffer: torch.Tensor) -> ExpertWeights:
        """ExpertWeights viewing a flat uint8 buffer (no copy)."""
        tensors = {f.name: buffer[f.offset:f.offset + f.nbytes].view(f.dtype).view(f.shape) for f in self.fields}
        parts = {}
        for m in MATRICES:
            q = self.quant[m]
            if q is None:
                parts[m] = tensors[m]
            else:
                parts[m] = _with_tensors(q, {k.split(".", 1)[1]: t for k, t in tensors.items()
                                             if k.startswith(m + ".")})
        return ExpertWeights(**parts, **{b: tensors[b] for b in BIASES if b in tensors})


def _with_tensors(q, tensors: dict[str, torch.Tensor]):
    """The weight `q` describes, over other tensors of the same shapes (a slot's views): its own
    `with_tensors`, or for a dataclass form whose fields are its tensors (`GGMLWeight.data`) a replace."""
    rebuild = getattr(q, "with_tensors", None)
    return rebuild(tensors) if rebuild is not None else replace(q, **tensors)
