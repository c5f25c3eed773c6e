"""Measuring an expert's `CostModel` on this machine: the link copy (`timing.copy_rate`, the one
copy-rate measurement), and each kernel's `Throughput` from timed forwards at 1 and `tokens` tokens.

`measure_throughput` times one kernel on weights the caller owns; `measure_costs` builds a
`CostModel` from one real expert; `measure_expert_costs` does it all from one expert as a checkpoint
gives it (what `tune` calls).
"""

from __future__ import annotations

import torch

from .cpu_kernels import cpu_form, expert_format, weight_nbytes
from ..base.timing import copy_rate, seconds_per_call
from .costs import CostModel, Throughput
from ..model.expert_interface import ExpertWeights, expert_forward
from .layout import ExpertLayout


def measure_throughput(weights: ExpertWeights, hidden: int, *, tokens: int = 8, repeats: int = 3,
                       dtype: torch.dtype | None = None) -> Throughput:
    """Time `expert_forward` on `weights` where they live (CPU form -> CPU kernels, a device slot ->
    device kernels) at 1 and `tokens` tokens of `dtype` activations (default: a float expert's own
    dtype, else bf16)."""
    device = weights.device
    if dtype is None:
        dtype = weights.w1.dtype if isinstance(weights.w1, torch.Tensor) else torch.bfloat16
    times = {}
    with torch.inference_mode():
        for n in (1, tokens):
            x = (torch.randn(n, hidden, generator=torch.Generator().manual_seed(n)) * 0.5).to(device, dtype)
            times[n] = min(seconds_per_call(lambda: expert_forward(x, weights), device, trials=repeats))
    factor = max(0.0, (times[tokens] / times[1] - 1) / (tokens - 1)) if tokens > 1 else 0.0
    return Throughput(weight_nbytes(weights) / times[1], factor)


def measure_costs(cpu_weights: ExpertWeights, device_weights: ExpertWeights, source: torch.Tensor,
                  target: torch.Tensor, *, hidden: int, dtype: torch.dtype | None = None, repeats: int = 3,
                  source_name: str = "measured") -> CostModel:
    """A cost model for one expert format from one real expert: `cpu_weights` in CPU form,
    `device_weights` on the device, and its flat host bytes `source` with a device buffer `target`
    of the same size to time the copy into."""
    return CostModel(link_bytes_per_second=copy_rate(source, target, repeats).high,
                     cpu={expert_format(cpu_weights): measure_throughput(cpu_weights, hidden, repeats=repeats,
                                                                         dtype=dtype)},
                     device={expert_format(device_weights): measure_throughput(device_weights, hidden,
                                                                               repeats=repeats, dtype=dtype)},
                     source=source_name)


def measure_expert_costs(expert: ExpertWeights, device: torch.device | str, *, dtype: torch.dtype | None = None,
                         repeats: int = 3) -> CostModel:
    """The cost model of one expert on this machine, from the expert as a checkpoint gives it
    (CPU tensors: float matrices or `QuantizedWeight`s): flattened into pinned host bytes as the
    host tier holds it, converted to its CPU form, copied to a `device` buffer. Allocates one
    expert on the device and about two in host RAM while it runs."""
    device = torch.device(device)
    layout = ExpertLayout(expert)
    source = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    layout.write(source, expert)
    target = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    return measure_costs(cpu_form(layout.view(source)), layout.view(target), source, target,
                         hidden=expert.w1.shape[1], dtype=dtype, repeats=repeats)
