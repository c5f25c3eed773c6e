"""How many CPU threads torch's intra-op pool gets.

Why: a decode step is a few hundred short parallel regions (one per matrix product), each ending
at a barrier. When the pool has more threads than the machine has cores free, one of them is
often descheduled and the others wait for it at every barrier: on the 2-core dev machine with
other jobs running, 2 threads decoded ~10x slower than 1 (BENCHMARKS.md, "Threads"). So the
default is the cores this process may use minus the ones other work keeps busy, and never less
than one. "Busy" is measured now (/proc/stat over a tenth of a second, this process idle meanwhile),
not the 1-minute load average, which still counts a run that has just ended: on the 2-core machine a
benchmark started right after another got 1 thread for that reason, and decoded at half speed
(BENCHMARKS.md, "Threads"). Without /proc/stat: the load average.
"""

from __future__ import annotations

import os
import time

import torch

from .errors import OffloadMoeError


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]                       # idle and iowait
    total = sum(fields[:8])                            # guest time is already inside user time
    return total - idle, total


def busy_cores(seconds: float = 0.1) -> float | None:
    """How many of the machine's CPUs other work keeps busy right now (this process sleeps while it
    measures), or None without /proc/stat."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or 1)


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Cores not kept busy by other work: max(1, cores - round(load)), load the busy CPUs measured
    now (`busy_cores`), or the 1-minute load average where that cannot be measured."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        load = busy_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, cores - round(load)))


def set_threads(threads: int | str | None) -> int:
    """Set torch's intra-op threads: an int >= 1, or None / "auto" for `default_threads()`.
    Returns the number set."""
    if threads is None or threads == "auto":
        n = default_threads()
    elif isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        n = threads
    elif isinstance(threads, str) and threads.isdigit() and int(threads) >= 1:
        n = int(threads)
    else:
        raise OffloadMoeError(f"threads = {threads!r}, expected an integer >= 1 or 'auto'")
    torch.set_num_threads(n)
    return n
