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

This file is the model only. `cost_timing.py` measures one (`measure_costs`,
`measure_expert_costs`, what `tune` and `load()` call); `cost_file.py` keeps one model per machine
in the user config directory, where `tune` writes it and `load()` reads it (measuring quickly at
load when there is none).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


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
