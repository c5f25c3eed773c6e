"""What an offloaded expert costs on this machine: the host → device copy of one expert and one
expert's SwiGLU per bit width (in a device slot, and in the hybrid's CPU form), plus the disk read;
and the hybrid engine's cost model built from those figures.

The link is `timing.measure_copy_rate` and the compute `experts/cost_timing.py`'s
`measure_throughput`, so the figures tune reports are the ones the hybrid CPU/GPU engine's cost
model uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.runtime import Progress, resolve_device
from ..experts.cpu_kernels import cpu_form as to_cpu_form
from ..experts.cpu_kernels import weight_nbytes
from ..experts.cost_timing import measure_throughput
from ..experts.costs import CostModel, Throughput
from ..model.expert_interface import ExpertWeights
from ..kernels.format import FLOAT_SETTINGS, INT_SETTINGS
from ..kernels.groupwise import QuantizedWeight
from ..kernels.pack import packed_cols
from ..base.timing import measure_copy_rate
from .disk import DISK_TEST_BYTES, measure_disk_read

EXPERT_BITS = ("bf16", "int8", "int4", "int3", "int2")
FLOAT_WIDTHS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class ExpertSpec:
    """The expert a measurement times: its shape, the activations' dtype (float widths compute in their
    own), the group size of packed widths (None: `pick_group_size`) and the bytes one miss copies
    (None: the expert at bf16)."""
    hidden: int
    intermediate: int
    dtype: torch.dtype = torch.bfloat16
    group_size: int | None = None
    nbytes: int | None = None

    @property
    def group(self) -> int:
        return self.group_size or pick_group_size(self.hidden, self.intermediate)


def measure_link_bandwidth(device: torch.device | str, nbytes: int, *, repeats: int = 5) -> float:
    """Bytes/s of copying one `nbytes` buffer (one expert) from host RAM into a buffer on `device`,
    as a miss does: from pinned RAM on CUDA, a RAM → RAM memcpy on the CPU. The fastest of
    `repeats` trials of `timing.measure_copy_rate` (the one copy-rate measurement)."""
    return measure_copy_rate(nbytes, "cpu", torch.device(device), repeats).high


def pick_group_size(hidden: int, intermediate: int, preferred: int = 64) -> int:
    """`preferred` when it divides both dimensions, else the largest power of two up to 128 that
    does, else their gcd (the groupwise format needs groups that tile every row)."""
    if hidden % preferred == 0 and intermediate % preferred == 0:
        return preferred
    g = math.gcd(hidden, intermediate)
    for size in (128, 64, 32, 16, 8, 4, 2):
        if g % size == 0:
            return size
    return g


def random_expert(hidden: int, intermediate: int, bits: str, device: torch.device | str, *,
                  dtype: torch.dtype = torch.bfloat16, group_size: int = 64):
    """An `ExpertWeights` of the given shape and width with arbitrary (finite, small) values: what
    a timing needs, without paying for quantization. Ints are packed groupwise `QuantizedWeight`s."""
    device = torch.device(device)
    shapes = {"w1": (intermediate, hidden), "w3": (intermediate, hidden), "w2": (hidden, intermediate)}
    if bits in INT_SETTINGS:
        b = INT_SETTINGS[bits]
        mats = {}
        for name, (out, in_) in shapes.items():
            packed = torch.randint(0, 256, (out, packed_cols(in_, b)), dtype=torch.uint8, device=device)
            groups = (out, in_ // group_size)
            scales = torch.full(groups, 0.01, dtype=torch.float16, device=device)
            zeros = torch.full(groups, float(2 ** (b - 1)), dtype=torch.float16, device=device)
            mats[name] = QuantizedWeight(packed, scales, zeros, b, group_size, (out, in_))
        return ExpertWeights(**mats)
    if bits not in FLOAT_SETTINGS:
        raise ValueError(f"bit width {bits!r}: expected one of {', '.join((*INT_SETTINGS, *FLOAT_SETTINGS))}")
    float_dtype = getattr(torch, FLOAT_SETTINGS[bits])
    return ExpertWeights(**{name: (torch.randn(shape, device=device) * 0.02).to(float_dtype)
                            for name, shape in shapes.items()})


def measure_expert_throughput(device: torch.device | str, expert: ExpertSpec, bits: str, *, cpu_form: bool = False,
                              tokens: int = 8, repeats: int = 3):
    """`experts.costs.Throughput` of one `expert` at width `bits`: `expert_forward` at 1 and `tokens`
    tokens of the spec's activations (float widths: their own dtype), timed by
    `experts.cost_timing.measure_throughput`.

    cpu_form=False: the weights on `device` as an expert slot holds them, so ints go through
    `qlinear` (the fused kernel on CUDA where available, dequantize + F.linear elsewhere).
    cpu_form=True: on the CPU in the form the hybrid's CPU tier computes from (`cpu.kernels`:
    torch's int4 CPU kernel where the shape allows it)."""
    return _throughput(device, expert, bits, cpu_form=cpu_form, tokens=tokens, repeats=repeats)[0]


def _throughput(device, expert: ExpertSpec, bits, *, cpu_form, tokens, repeats):
    """(Throughput, weight bytes one forward reads)."""
    hidden, intermediate, dtype = expert.hidden, expert.intermediate, expert.dtype
    if bits in FLOAT_SETTINGS:  # float weights compute in their own dtype, as the model does
        dtype = getattr(torch, FLOAT_SETTINGS[bits])
    if cpu_form:
        w = to_cpu_form(random_expert(hidden, intermediate, bits, "cpu", dtype=dtype, group_size=expert.group))
    else:
        w = random_expert(hidden, intermediate, bits, device, dtype=dtype, group_size=expert.group)
    throughput = measure_throughput(w, hidden, tokens=tokens, repeats=repeats, dtype=dtype)
    nbytes = weight_nbytes(w)
    del w
    return throughput, nbytes


def measure_expert_compute(device: torch.device | str, expert: ExpertSpec, bits: str, *, repeats: int = 3) -> float:
    """Seconds for one expert's SwiGLU on one token at `bits` on `device`, weights as a slot holds
    them (see `measure_expert_throughput`)."""
    t, nbytes = _throughput(device, expert, bits, cpu_form=False, tokens=1, repeats=repeats)
    return t.seconds(nbytes, 1)


def measure_machine(device: torch.device | str, expert: ExpertSpec, *, bits: Iterable[str] = EXPERT_BITS,
                    disk_bytes: int = DISK_TEST_BYTES, disk_dir: str | Path | None = None, repeats: int = 3,
                    cpu_forms: bool = True, progress: Progress | None = None) -> dict:
    """Link bandwidth, disk read bandwidth and per-width expert compute for `expert` (one miss copies
    `expert.nbytes`). Every figure is a positive finite number.

    Keys: link_bytes_per_second, disk_read_bytes_per_second (+ disk_cold: whether the page cache
    was dropped), expert_seconds {width: seconds for one token on the device}, and for the cost
    model of the hybrid engine `device_throughput` and (cpu_forms) `cpu_throughput`
    {width: {"bytes_per_second", "token_factor"}} (`experts.costs.Throughput` fields)."""
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    hidden, intermediate, dtype, group = expert.hidden, expert.intermediate, expert.dtype, expert.group
    bits = list(bits)
    report = progress or (lambda what, done, total: None)
    total, done = 2 + len(bits) * (2 if cpu_forms else 1), 0
    nbytes = expert.nbytes or 3 * hidden * intermediate * 2

    def step():
        nonlocal done
        done += 1
        report("machine", done, total)

    report("machine", 0, total)
    # the fastest of many copies: a busy machine slows some of them, never speeds one up
    link = measure_link_bandwidth(device, nbytes, repeats=max(repeats, 20))
    step()
    disk = measure_disk_read(disk_bytes, disk_dir)
    step()
    compute, cpu_compute, on_device, on_cpu = {}, {}, {}, {}
    for b in bits:
        t, wbytes = _throughput(device, expert, b, cpu_form=False, tokens=8, repeats=repeats)
        on_device[b] = {"bytes_per_second": t.bytes_per_second, "token_factor": t.token_factor}
        compute[b] = t.seconds(wbytes, 1)
        step()
        if cpu_forms:
            if device.type != "cuda" and b in FLOAT_WIDTHS:  # the CPU form is the slot form: same figure
                on_cpu[b], cpu_compute[b] = on_device[b], compute[b]
            else:
                t, wbytes = _throughput(device, expert, b, cpu_form=True, tokens=8, repeats=repeats)
                on_cpu[b] = {"bytes_per_second": t.bytes_per_second, "token_factor": t.token_factor}
                cpu_compute[b] = t.seconds(wbytes, 1)
            step()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "link": "pinned RAM → GPU" if device.type == "cuda" else "RAM → RAM",
        "link_bytes_per_second": link,
        "link_copy_bytes": nbytes,
        "disk_read_bytes_per_second": disk["bytes_per_second"],
        "disk_bytes": disk["bytes"],
        "disk_cold": disk["cold"],
        "disk_filesystem": disk["filesystem"],
        "disk_dir": disk["directory"],
        "expert_shape": [hidden, intermediate],
        "expert_dtype": str(dtype).removeprefix("torch."),
        "expert_group_size": group,
        "expert_seconds": compute,
        "device_throughput": on_device,
    }
    if cpu_forms:
        out["cpu_expert_seconds"] = cpu_compute
        out["cpu_throughput"] = on_cpu
    return out


def cost_model(measurements: dict, source: str = "offload-moe tune"):
    """The hybrid engine's `experts.costs.CostModel` from `measure_machine`'s figures (None when
    there are none): save it with `experts.cost_file.save_costs` so `load()` need not measure."""
    if not measurements or "cpu_throughput" not in measurements:
        return None
    return CostModel(link_bytes_per_second=measurements["link_bytes_per_second"],
                     cpu={k: Throughput(**v) for k, v in measurements["cpu_throughput"].items()},
                     device={k: Throughput(**v) for k, v in measurements["device_throughput"].items()},
                     source=source)
