"""The checkpoint file itself as the host tier: experts read by byte range where they lie.

Why: a model bigger than RAM used to be copied, expert by expert, into files under `offload_dir`
before the first token (an 18 GB copy of a 17 GB GGUF). When the file's layout is the layout the
CPU computes from (a GGUF block matrix: `GGMLWeight`), the copy is pointless: expert e of a stacked
`blk.i.ffn_*_exps` tensor is one contiguous byte range of the file. `SourceStore` stands where
`HostStore` stands for the expert cache, with no RAM tier and no files of its own: a miss is a
`pread` of the expert's ranges straight into the cache slot (the slots are the RAM expert cache,
their count × bytes per expert its byte budget). Same bytes, same form: a slot view computes bit
for bit what the resident view of the mapping computes.

Reads run on one I/O thread (`IOThread`), so a prefetch from the next layers' router guesses
overlaps the compute of this layer; a demand read is queued behind the prefetches already issued
(one FIFO: a slot is never written by two reads at once) and waited for when the expert is used.
`pread` releases the GIL, and the page cache still serves a hot file.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..base.errors import OffloadMoeError
from .layout import ExpertLayout

WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)   # None where the platform has no posix_fadvise

# An expert's ranges: layout field name -> (file, byte offset, byte count).
Ranges = dict[str, tuple[Path, int, int]]


def source_fields(layout: ExpertLayout, ranges: Ranges) -> bool:
    """Whether every field of the layout is one range of the file, byte for byte (same size; the
    file's type is the computed type): then the file can be the tier, no conversion needed."""
    by_field = {f.name.split(".", 1)[0]: f for f in layout.fields}
    return set(by_field) == set(ranges) and all(
        f.nbytes == ranges[m][2] and f.name in (m, m + ".data") for m, f in by_field.items())


class SourceStore:
    """`HostStore`'s reading side over the source file: `read_into(layer, expert, target)` fills a
    slot with the expert's bytes; no RAM tier, nothing written anywhere."""

    pinned = False
    ram_layers = 0
    disk_dir = None
    pinned_bytes = 0

    def __init__(self, layout: ExpertLayout, first_ranges, num_layers: int, num_experts: int):
        """first_ranges(layer) -> `Ranges` of expert 0 of that (engine-numbered) layer: expert e of a
        stacked tensor lies e · bytes further on (equal contiguous slices), so nothing is done per
        expert here."""
        self.layout, self.num_layers, self.num_experts = layout, num_layers, num_experts
        self.layer_bytes = num_experts * layout.nbytes
        offsets = {f.name.split(".", 1)[0]: (f.offset, f.nbytes) for f in layout.fields}
        self._fds: dict[Path, int] = {}
        # per layer: [(fd, file offset of expert 0, slot offset, bytes per expert)] (plain ints)
        self._reads = []
        for layer in range(num_layers):
            r = first_ranges(layer)
            self._reads.append([(self._fd(r[m][0]), r[m][1], offsets[m][0], offsets[m][1]) for m in offsets])
        self.bytes_read = [0] * num_layers
        self.io = IOThread()

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    # ---- placement facts (HostStore's) ----
    def tier(self, layer: int) -> str:
        return "file"

    @property
    def ram_bytes(self) -> int:
        return 0

    @property
    def disk_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    # ---- reading ----
    def read_into(self, layer: int, expert: int, target: torch.Tensor) -> None:
        """pread the expert's ranges into a flat uint8 slot (CPU) of `layout.nbytes`, on this thread."""
        buf = target.numpy()
        for fd, first, at, n in self._reads[layer]:
            view, offset = memoryview(buf[at:at + n]), first + expert * n
            done = 0
            while done < n:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    path = next(p for p, f in self._fds.items() if f == fd)
                    raise OffloadMoeError(f"{path}: expert {expert} of MoE layer {layer} ends {n - done:,} bytes "
                                          "past the end of the file (truncated after it was opened?)")
                done += got
        self.bytes_read[layer] += self.layout.nbytes

    def submit(self, layer: int, expert: int, target: torch.Tensor) -> Future:
        """`read_into` on the I/O thread, after every read submitted before it. The kernel is told at
        once that the expert's ranges will be needed (POSIX_FADV_WILLNEED: asynchronous readahead into
        the page cache), so the disk works on every queued read together while the thread copies them
        out one by one: a burst of misses (a prompt, several guessed layers) is read at the device's
        queue depth instead of one expert at a time."""
        self.will_need(layer, (expert,))
        return self.io.submit(self.read_into, layer, expert, target)

    def will_need(self, layer: int, experts) -> None:
        """Ask the kernel to start reading these experts' ranges into the page cache now (no slot is
        needed for that): a layer whose misses outnumber its free slots reads them one slot at a time,
        and each then comes from memory while the disk has already moved on to the next."""
        if WILLNEED is not None:
            for expert in experts:
                for fd, first, _, n in self._reads[layer]:
                    os.posix_fadvise(fd, first + expert * n, n, WILLNEED)

    def close(self) -> None:
        self.io.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter teardown
            pass


class IOThread:
    """One worker thread running reads in the order they were submitted (started on first use)."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn, *args) -> Future:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-moe-io")
            return self._pool.submit(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
