"""What bench measures beside the generation itself: the memcpy peak, the time of every copy the
engine makes, decode step times, peak memory, and the machine the run is on."""

from __future__ import annotations

import gc
import os
import resource
import statistics

import torch

from ..base.timing import measure_copy_rate


def measure_memcpy(nbytes: int, device: torch.device, *, repeats: int = 10, trials: int = 7,
                   warmup: int = 3) -> dict:
    """Peak copy rate of one expert-sized buffer: pinned host→device on CUDA, RAM→RAM on the CPU
    (`timing.measure_copy_rate`: `warmup` untimed copies, then `trials` trials of `repeats` copies);
    the best trial is the peak (decimal GB/s)."""
    rate = measure_copy_rate(nbytes, "cpu", device, trials, repeats=repeats, warmup=warmup)
    kind = "pinned host->device" if device.type == "cuda" else "host RAM->RAM memcpy"
    return {"kind": kind, "bytes": nbytes, "repeats": repeats, "trials": trials, "warmup": warmup,
            "peak_gbps": rate.high / 1e9, "median_gbps": rate.median / 1e9,
            "trial_gbps": [r / 1e9 for r in rate.trials]}


class CopyTimer:
    """Reads the copy time the engine counts itself (`stats()["copy_seconds"]`, see `copy_seconds` in
    the package docstring): every host-to-device expert copy, demand and prefetch. None for a
    provider that makes no copies."""

    def __init__(self, cache):
        self.cache = cache
        self.start = cache.stats().get("copy_seconds") if hasattr(cache, "stats") else None

    def total(self) -> float | None:
        if self.start is None:
            return None
        return self.cache.stats()["copy_seconds"] - self.start


def decode_steps(stamps: list[float]) -> dict:
    """Fastest and median time between consecutive generated tokens (decode steps)."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"decode_step_min_seconds": min(steps) if steps else None,
            "decode_step_median_seconds": statistics.median(steps) if steps else None}


def reset_peaks(device: torch.device) -> bool:
    """Reset peak VRAM and peak RSS counters; True if the RSS peak could be reset (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if os.uname().sysname == "Darwin" else rss * 1024   # Linux reports KiB


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "total_memory_bytes": p.total_memory,
                "cpu_threads": torch.get_num_threads()}
    return {"type": device.type, "name": _cpu_name(), "total_memory_bytes": None,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
