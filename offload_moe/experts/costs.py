"""What an expert that is not in a device slot costs: copied over the link, or computed on the CPU.

The hybrid engine (`ExpertCache` with a CPU tier) asks this model, per miss, how long each choice
takes. Every figure is measured on this machine, never a constant:

- the link: bytes/s of one expert's host -> device copy (pinned RAM -> GPU, as a miss copies);
- the CPU kernels, per expert format ("int4", "int8", "bf16", ...): weight bytes read per second
  by one expert's forward at one token, and how much each further token adds;
- the device kernels, the same two figures for an expert in a device slot.

A forward's time is modelled as `bytes / bytes_per_second * (1 + token_factor * (tokens - 1))`:
at one token an expert is a matrix-vector product bound by how fast its bytes are read; more
tokens reuse the bytes and add compute. Two timed points per kernel (1 and `tokens` tokens) fix
both numbers.

`measure_link` and `measure_throughput` time one thing each on tensors the caller owns;
`measure_costs` builds a `CostModel` from them; `measure_expert_costs` does it all from one
expert as a checkpoint gives it (what `tune` calls). `save_costs` / `saved_costs` keep one model
per machine in the user config directory, where `tune` writes it and `load()` reads it (measuring
quickly at load when there is none).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cpu.kernels import cpu_form, expert_format, weight_nbytes
from .layout import ExpertLayout
from .interface import ExpertWeights, expert_forward

COSTS_FILE = "cpu-costs.json"


@dataclass(frozen=True)
class Throughput:
    """How fast one kernel reads an expert's weights."""

    bytes_per_second: float      # weight bytes read per second by a one-token forward
    token_factor: float = 0.0    # each token past the first adds this fraction of the one-token time

    def seconds(self, nbytes: int, tokens: int = 1) -> float:
        return nbytes / self.bytes_per_second * (1 + self.token_factor * (max(tokens, 1) - 1))


@dataclass(frozen=True)
class CostModel:
    link_bytes_per_second: float                                    # host -> device, one expert at a time
    cpu: dict[str, Throughput] = field(default_factory=dict)        # format -> CPU kernels
    device: dict[str, Throughput] = field(default_factory=dict)     # format -> device kernels
    source: str = "given"                                           # "measured at load", a file path...

    def copy_seconds(self, nbytes: int) -> float:
        return nbytes / self.link_bytes_per_second

    def cpu_seconds(self, fmt: str, nbytes: int, tokens: int = 1) -> float:
        """CPU forward time; infinite for a format never measured (so it is never chosen)."""
        t = self.cpu.get(fmt)
        return t.seconds(nbytes, tokens) if t else math.inf

    def device_seconds(self, fmt: str, nbytes: int, tokens: int = 1) -> float:
        t = self.device.get(fmt)
        return t.seconds(nbytes, tokens) if t else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        return cls(float(d["link_bytes_per_second"]),
                   {k: Throughput(**v) for k, v in d.get("cpu", {}).items()},
                   {k: Throughput(**v) for k, v in d.get("device", {}).items()},
                   d.get("source", "given"))


# ---- measuring ----

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[..., object], args: tuple, device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` timed calls of `fn(*args)` after one warm-up (a shared machine's bursts
    don't count)."""
    fn(*args)
    best = math.inf
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def measure_link(source: torch.Tensor, target: torch.Tensor, *, repeats: int = 5) -> float:
    """Bytes/s of `target.copy_(source)`: one expert's host -> device copy, as a miss does it
    (pass pinned host memory and a device slot; on the CPU it is a RAM -> RAM copy)."""
    pinned = source.device.type == "cpu" and target.device.type == "cuda" and source.is_pinned()
    seconds = _best_seconds(target.copy_, (source, pinned), target.device, repeats)
    return source.numel() * source.element_size() / seconds


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
            times[n] = _best_seconds(expert_forward, (x, weights), device, repeats)
    factor = max(0.0, (times[tokens] / times[1] - 1) / (tokens - 1)) if tokens > 1 else 0.0
    return Throughput(weight_nbytes(weights) / times[1], factor)


def measure_memcpy(nbytes: int = 256 * 2**20, *, repeats: int = 3) -> float:
    """Bytes/s of a large RAM -> RAM tensor copy (bytes copied; the memory moves twice that)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return nbytes / _best_seconds(dst.copy_, (src,), torch.device("cpu"), repeats)


def measure_costs(cpu_weights: ExpertWeights, device_weights: ExpertWeights, source: torch.Tensor,
                  target: torch.Tensor, *, hidden: int, dtype: torch.dtype | None = None, repeats: int = 3,
                  source_name: str = "measured") -> CostModel:
    """A cost model for one expert format from one real expert: `cpu_weights` in CPU form,
    `device_weights` on the device, and its flat host bytes `source` with a device buffer `target`
    of the same size to time the copy into."""
    return CostModel(link_bytes_per_second=measure_link(source, target, repeats=repeats),
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


# ---- one saved model per machine ----

def machine_key(device: torch.device) -> str:
    """What a saved cost model must match: the device, and the CPU threads compute will use."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def costs_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "offload-moe" / COSTS_FILE


def save_costs(model: CostModel, device: torch.device, path: Path | None = None) -> Path:
    """Store `model` for this machine (merged into the file's other machines); returns the path."""
    path = path or costs_path()
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    saved[machine_key(torch.device(device))] = model.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1))
    return path


def saved_costs(device: torch.device, formats: tuple[str, str] | None = None,
                path: Path | None = None) -> CostModel | None:
    """The saved model for this machine, if there is one that knows `formats` = (cpu, device)."""
    path = path or costs_path()
    try:
        d = json.loads(path.read_text()).get(machine_key(torch.device(device)))
        model = CostModel.from_dict({**d, "source": str(path)}) if d else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if model is None or (formats and (formats[0] not in model.cpu or formats[1] not in model.device)):
        return None
    return model
