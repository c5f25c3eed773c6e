"""Timing on a noisy machine: repeated trials after a warm-up, reported as a median with its spread.

`measure_copy_rate` is the one copy-rate measurement every layer uses (the hybrid engine's cost
model, `tune`'s link figure, bench's memcpy peak, the CPU kernel script): `trials` timed rounds of
`repeats` copies of one buffer, after `warmup` untimed copies (page faults, allocator, clocks).
A copy that involves a CUDA device is timed with CUDA events on a side stream, from pinned host
memory when the source is the host (as a miss copies); a host-to-host copy by the wall clock.
`copy_rate` does the same on tensors the caller owns (an expert's real host bytes and slot).

`seconds_per_call` is the same loop for any callable (a kernel's forward). A busy machine slows
some trials and never speeds one up, so `high` (the fastest trial) is the machine's rate and
`median` what a run typically sees; `low` says how noisy the machine was.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rate:
    """Bytes per second over the trials: the median, the slowest and the fastest trial."""

    median: float
    low: float
    high: float
    trials: tuple[float, ...] = ()   # every trial's rate, in the order measured

    @classmethod
    def of(cls, rates: list[float]) -> Rate:
        if not rates:
            raise ValueError("a rate needs at least one trial")
        return cls(statistics.median(rates), min(rates), max(rates), tuple(rates))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, *, trials: int = 3,
                     warmup: int = 1) -> list[float]:
    """Wall seconds of each of `trials` calls of `fn()` after `warmup` untimed calls, the device's
    queued work waited for around each call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(max(1, trials)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(max(time.perf_counter() - t0, 1e-9))
    return out


def copy_rate(src: torch.Tensor, dst: torch.Tensor, trials: int = 5, *, repeats: int = 1,
              warmup: int = 2) -> Rate:
    """Bytes/s of `dst.copy_(src)` (same number of bytes, any devices) over `trials` rounds of
    `repeats` copies each."""
    nbytes = src.numel() * src.element_size()
    if nbytes < 1 or dst.numel() * dst.element_size() != nbytes:
        raise ValueError(f"copy of {nbytes} bytes into {dst.numel() * dst.element_size()}: expected two "
                         "non-empty buffers of the same size")
    trials, repeats = max(1, trials), max(1, repeats)
    cuda = dst.device if dst.device.type == "cuda" else src.device if src.device.type == "cuda" else None
    if cuda is None:
        def copies():
            for _ in range(repeats):
                dst.copy_(src)
        seconds = seconds_per_call(copies, src.device, trials=trials, warmup=warmup)
        return Rate.of([repeats * nbytes / s for s in seconds])
    stream = torch.cuda.Stream(cuda)
    rates = []
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            dst.copy_(src, non_blocking=True)
        stream.synchronize()
        for _ in range(trials):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(repeats):
                dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            rates.append(repeats * nbytes / max(start.elapsed_time(end) / 1000, 1e-9))
    return Rate.of(rates)


def measure_copy_rate(nbytes: int, src_device: torch.device | str = "cpu", dst_device: torch.device | str = "cpu",
                      trials: int = 5, *, repeats: int = 1, warmup: int = 2) -> Rate:
    """Bytes/s of copying one `nbytes` buffer from `src_device` to `dst_device` (host memory pinned
    when the other side is a CUDA device), over `trials` rounds of `repeats` copies."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes = {nbytes!r}: expected a positive buffer size")
    src_device, dst_device = torch.device(src_device), torch.device(dst_device)
    pin = "cuda" in (src_device.type, dst_device.type)
    src = torch.empty(nbytes, dtype=torch.uint8, device=src_device,
                      pin_memory=pin and src_device.type == "cpu").fill_(1)  # every page touched
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=dst_device, pin_memory=pin and dst_device.type == "cpu")
    try:
        return copy_rate(src, dst, trials, repeats=repeats, warmup=warmup)
    finally:
        del src, dst
