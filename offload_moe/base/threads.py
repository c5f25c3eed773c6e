"""How many CPU threads torch's intra-op pool gets.

Why: a decode step is a few hundred short parallel regions (one per matrix product), each ending
at a barrier. When the pool has more threads than the machine has cores free, one of them is
often descheduled and the others wait for it at every barrier: on the 2-core dev machine with
other jobs running, 2 threads decoded ~10x slower than 1 (BENCHMARKS.md, "Threads"). So the
default is the cores this process may use minus the ones other work keeps busy (the 1-minute
load average, rounded), and never less than one.
"""

from __future__ import annotations

import os

import torch

from .errors import OffloadMoeError


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Cores not kept busy by other work: max(1, cores - round(1-minute load average))."""
    cores = usable_cores() if cores is None else cores
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
