"""The host tier: where every expert's bytes live when not in a device slot.

Whole layers are kept in RAM (pinned when the compute device is CUDA, so copies run at full link
speed and asynchronously; pinned.py pins them without power-of-two waste and says exactly what it
pinned, which is what the budget counts) until the RAM budget is spent; the remaining layers go to one file per
layer under `offload_dir`, read back through mmap. Bytes are stored in the form they are computed in
(the flat `ExpertLayout` buffer, packed when quantized), so a miss moves the fewest bytes.

The disk files live in a private per-process directory (`disk_dir.DiskDir`) that is removed at exit;
every read checks the file's size and a sampled checksum of the expert, so a file truncated or
rewritten behind our back is a clear error instead of a crash (SIGBUS) or wrong output.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch

from ..base.errors import OffloadMoeError
from .disk_dir import DiskDir
from .layout import ExpertLayout
from .pinned import PinnedArena, default_strategy


def human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


class HostStore:
    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, *, offload: str = "ram",
                 ram_budget: int | None = None, offload_dir: str | Path | None = None, pin=False, check_ram=None):
        """pin: False, True (pinned, made the first way that works here) or how pinned memory is made
        (a `pinned.Registered` / `pinned.Pow2Chunks`). check_ram(what, bytes): raises if the RAM tier
        would not fit in the RAM available (called before it is allocated)."""
        pin, pinning = (pin, None) if isinstance(pin, bool) else (True, pin)
        if offload not in ("ram", "disk"):
            raise OffloadMoeError(f"offload = {offload!r}, expected 'ram' or 'disk'")
        self.layout, self.num_layers, self.num_experts = layout, num_layers, num_experts
        self.layer_bytes = num_experts * layout.nbytes
        self.pinning = (pinning or default_strategy()) if pin and offload == "ram" else None

        def ram_cost(layers: int) -> int:  # host bytes `layers` RAM layers really take
            n = layers * num_experts
            return self.pinning.cost(n, layout.nbytes) if self.pinning else n * layout.nbytes

        if offload == "disk":
            ram_layers = 0
        elif ram_budget is None:
            ram_layers = num_layers
        else:
            if ram_budget < ram_cost(1):
                raise OffloadMoeError(f"ram_budget = {human(ram_budget)} is smaller than one layer's experts "
                                      f"({human(ram_cost(1))}{' pinned' if self.pinning else ''}); raise it or "
                                      "use offload='disk'")
            ram_layers = max(k for k in range(1, num_layers + 1) if ram_cost(k) <= ram_budget)
        self.ram_layers = ram_layers
        if check_ram is not None:  # before the RAM tier is allocated: (what, bytes) -> raise if too much
            check_ram(f"the RAM tier ({ram_layers} layers of experts)", ram_cost(ram_layers))
        self.pinned = pin
        # RAM tier: per layer, E flat uint8 views of nbytes each, allocated once.
        self._arena = None
        if self.pinning and ram_layers:
            self._arena = PinnedArena(self.pinning, ram_layers * num_experts, layout.nbytes)
            items = self._arena.items
            self.ram = [items[k * num_experts:(k + 1) * num_experts] for k in range(ram_layers)]
        else:
            self.ram = [torch.empty((num_experts, layout.nbytes), dtype=torch.uint8, pin_memory=pin)
                        for _ in range(ram_layers)]
        self.pinned_bytes = self._arena.pinned_bytes if self._arena else 0
        self.disk_dir = None
        self._dir: DiskDir | None = None
        self.disk: dict[int, torch.Tensor] = {}
        self._staging: dict[int, torch.Tensor] = {}
        if ram_layers < num_layers:
            self._dir = DiskDir(offload_dir, (num_layers - ram_layers) * self.layer_bytes)
            self.disk_dir = self._dir.path
            weakref.finalize(self, self._dir.remove)  # a store dropped before exit takes its files along

    # ---- placement facts ----
    def tier(self, layer: int) -> str:
        return "ram" if layer < self.ram_layers else "disk"

    @property
    def ram_bytes(self) -> int:
        return self.ram_layers * self.layer_bytes

    @property
    def disk_bytes(self) -> int:
        return (self.num_layers - self.ram_layers) * self.layer_bytes

    def close(self) -> None:
        """Unpin the RAM tier and remove the disk tier's files now (also done when the store is
        collected, and the files at exit)."""
        if self._arena is not None:
            self._arena.close()
        self.disk.clear()
        if self._dir is not None:
            self._dir.remove()

    # ---- filling (at load) ----
    @staticmethod
    def _name(layer: int) -> str:
        return f"layer-{layer:03d}.experts"

    def staging(self, layer: int) -> torch.Tensor:
        """A host buffer to assemble one disk layer in before it is written (reused across layers)."""
        if layer < self.ram_layers:
            return self.ram[layer]
        buf = self._staging.get(0)
        if buf is None:
            buf = self._staging[0] = torch.empty((self.num_experts, self.layout.nbytes), dtype=torch.uint8)
        return buf

    def commit_layer(self, layer: int) -> None:
        """After `staging(layer)` was filled: write a disk layer out and map it back."""
        if layer < self.ram_layers:
            return
        path = self._dir.write(self._name(layer), self.staging(layer).numpy())
        self.disk[layer] = torch.from_file(str(path), shared=False, size=self.layer_bytes,
                                           dtype=torch.uint8).view(self.num_experts, self.layout.nbytes)

    def finish(self) -> None:
        self._staging.clear()

    # ---- reading (every miss) ----
    def expert(self, layer: int, expert: int) -> torch.Tensor:
        """The flat uint8 bytes of one expert (a view: RAM or mmap)."""
        if layer < self.ram_layers:
            return self.ram[layer][expert]
        row = self.disk[layer][expert]
        self._dir.check(self._name(layer), expert, row)
        return row
