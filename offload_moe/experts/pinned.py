"""Pinned host memory that costs what it holds, counted exactly.

Why: PyTorch's pinned allocator rounds every block up to a power of two, so one pinned
(E, bytes_per_expert) buffer per layer pins up to 1.74x the experts' bytes (int3 Mixtral-8x7B:
19.7 GB of experts, 34.4 GB pinned) while the planner budgets the unrounded bytes. Two ways out,
both carving the host tier into whole experts (`PinnedArena.items`, one flat uint8 view each):

- `Registered` (first choice): ordinary pageable memory, page-aligned, locked in place with
  `cudaHostRegister`, in regions of at most `REGION_BYTES`; it pins each region rounded up to the
  4 KiB page, and unregisters at `close()` (or when the owner is collected).
- `Pow2Chunks` (where registration fails): blocks from PyTorch's pinned allocator of exactly
  2^k bytes each, sizes chosen so that the fewest bytes are pinned for the whole set of experts;
  no expert straddles two blocks.

`cost(n, item_bytes)` is what a strategy will pin for n items, before allocating anything: the
host store sizes its RAM tier by it and the planner budgets it (`planned_bytes`).
"""

from __future__ import annotations

import weakref
from functools import lru_cache

import torch

PAGE = 4096
REGION_BYTES = 1 << 30     # registered regions of whole items, at most 1 GiB each (or one item)
MAX_CHUNK = 1 << 32        # the largest pinned block Pow2Chunks asks PyTorch for (4 GiB)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Registered:
    """Page-aligned pageable memory pinned with cudaHostRegister: exact size up to a page per region."""

    name = "registered"

    def __init__(self, register=None, unregister=None):
        # register(ptr, nbytes) -> error code (0 = success), unregister(ptr): the CUDA runtime's
        # by default; tests pass recorders and run on the CPU
        if register is None:
            cudart = torch.cuda.cudart()
            register = lambda ptr, n: cudart.cudaHostRegister(ptr, n, 0)  # noqa: E731
            unregister = cudart.cudaHostUnregister
        self.register, self.unregister = register, unregister

    @staticmethod
    def regions(n: int, item_bytes: int) -> list[int]:
        """Items per region."""
        per = max(1, REGION_BYTES // item_bytes)
        return [per] * (n // per) + ([n % per] if n % per else [])

    def cost(self, n: int, item_bytes: int) -> int:
        return sum(_round_up(k * item_bytes, PAGE) for k in self.regions(n, item_bytes))

    def allocate(self, n: int, item_bytes: int):
        """-> (items, [(base tensor, registered ptr, registered bytes)]), or raises RuntimeError."""
        items, regions = [], []
        try:
            for k in self.regions(n, item_bytes):
                size = _round_up(k * item_bytes, PAGE)
                base = torch.empty(size + PAGE, dtype=torch.uint8)  # room to start on a page boundary
                skip = -base.data_ptr() % PAGE
                region = base[skip:skip + size]
                err = self.register(region.data_ptr(), size)
                if int(getattr(err, "value", err)) != 0:
                    raise RuntimeError(f"cudaHostRegister of {size:,} bytes failed ({err})")
                regions.append((base, region.data_ptr(), size))
                items.extend(region[i * item_bytes:(i + 1) * item_bytes] for i in range(k))
        except BaseException:
            self.release(regions)
            raise
        return items, regions

    def release(self, regions) -> None:
        for _, ptr, _ in regions:
            self.unregister(ptr)
        regions.clear()

    def pinned(self, regions) -> int:
        return sum(size for _, _, size in regions)


class Pow2Chunks:
    """PyTorch's pinned allocator, asked only for exact powers of two, each carved into whole items."""

    name = "pow2-chunks"

    def __init__(self, alloc=None):
        self.alloc = alloc or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))

    @staticmethod
    def chunks(n: int, item_bytes: int) -> list[int]:
        """Block sizes (powers of two, largest first) that hold n items with the fewest bytes."""
        return list(_best_chunks(n, item_bytes))

    def cost(self, n: int, item_bytes: int) -> int:
        return sum(self.chunks(n, item_bytes))

    def allocate(self, n: int, item_bytes: int):
        items, blocks = [], []
        for size in self.chunks(n, item_bytes):
            block = self.alloc(size)
            blocks.append(block)
            k = min(n - len(items), size // item_bytes)
            items.extend(block[i * item_bytes:(i + 1) * item_bytes] for i in range(k))
        return items, blocks

    def release(self, blocks) -> None:
        blocks.clear()  # back to PyTorch's cache of pinned blocks

    def pinned(self, blocks) -> int:
        return sum(b.numel() for b in blocks)


@lru_cache(maxsize=64)
def _best_chunks(n: int, item_bytes: int) -> tuple[int, ...]:
    if n == 0:
        return ()
    sizes = []
    size = 1 << max(0, (item_bytes - 1).bit_length())  # the smallest power of two holding one item
    while size <= max(MAX_CHUNK, 1 << (item_bytes - 1).bit_length()):
        sizes.append(size)
        if size >= n * item_bytes:
            break
        size <<= 1
    # cost[r]: fewest bytes holding r items; each step takes one block of some size
    best = [0] + [None] * n
    choice = [0] * (n + 1)
    for r in range(1, n + 1):
        for s in sizes:
            c = s + best[r - min(r, s // item_bytes)]
            if best[r] is None or c < best[r]:
                best[r], choice[r] = c, s
    out, r = [], n
    while r:
        out.append(choice[r])
        r -= min(r, choice[r] // item_bytes)
    return tuple(sorted(out, reverse=True))


def planned_bytes(n: int, item_bytes: int) -> int:
    """What the host tier pins for n experts of item_bytes under the first-choice strategy."""
    return Registered(register=lambda p, s: 0, unregister=lambda p: None).cost(n, item_bytes)


def default_strategy():
    """Registered if cudaHostRegister works here (probed on one page), else Pow2Chunks."""
    try:
        strategy = Registered()
        items, regions = strategy.allocate(1, PAGE)
        strategy.release(regions)
        return strategy
    except Exception:  # no CUDA runtime bindings, or the registration was refused
        return Pow2Chunks()


class PinnedArena:
    """n pinned items of item_bytes each (`items`: flat uint8 views); `pinned_bytes` what is really pinned."""

    def __init__(self, strategy, n: int, item_bytes: int):
        self.strategy = strategy
        self.items, held = strategy.allocate(n, item_bytes)
        self.pinned_bytes = strategy.pinned(held)
        self._finalizer = weakref.finalize(self, _release, strategy, held)

    def close(self) -> None:
        """Unpin (after the device has finished any copy from these pages). Views stay valid memory."""
        self._finalizer()


def _release(strategy, held) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # no copy may still read a page we unpin
    strategy.release(held)
