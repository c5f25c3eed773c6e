"""What a tune run tries and what it finds: a `Setting` (slots per layer, prefetch depth, tier), the
`Row` measured under it, the whole `TuneResult`, and the rule that picks the best row."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..base.errors import OffloadMoeError
from ..placement.options import Placement

TIERS = ("ram", "disk")


@dataclass(frozen=True)
class Setting:
    slots: int           # device slots per layer
    prefetch: int        # layers ahead
    tier: str            # "ram" or "disk"

    def __str__(self):
        return f"{self.slots} slots, prefetch {self.prefetch}, {self.tier}"

    def placement(self, base: Placement) -> Placement:
        """`base` with this setting's slots, prefetch depth and host tier."""
        return base.override(cache_slots=self.slots, prefetch=self.prefetch, offload=self.tier)


@dataclass
class Row:
    slots: int
    prefetch: int
    tier: str
    tokens: int = 0                         # tokens decoded (the first, from the prompt, not counted)
    decode_seconds: float = 0.0
    decode_tokens_per_second: float = 0.0
    hit_rate: float = 0.0                   # during decode
    bytes_moved: int = 0                    # expert bytes copied into slots during decode
    stall_seconds: float = 0.0
    prefetch_accuracy: float = 0.0
    load_seconds: float = 0.0
    timed_out: bool = False                 # stopped at the setting's deadline before `tokens`
    error: str | None = None                # e.g. out of device memory; such rows are never best
    runs: list[float] = field(default_factory=list)  # decode tok/s of each run (re-measured rows: several)

    @property
    def setting(self) -> Setting:
        return Setting(self.slots, self.prefetch, self.tier)


@dataclass
class TuneResult:
    model: str
    model_summary: str
    device: str                             # "cpu", "cuda", "cuda:1"
    device_type: str                        # the profile's device: "cpu" or "cuda"
    bits: dict                              # {"experts", "attention", "embeddings"}: the checkpoint's
    vram_budget: int                        # free VRAM when tuning started (0 on the CPU)
    tokens: int
    prompt_tokens: int
    measurements: dict
    rows: list[Row]
    best: Row
    skipped: int = 0                        # settings not run: the time budget ran out
    date: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def pick_best(rows: Iterable[Row]) -> Row:
    """Highest decode tokens/s; ties go to fewer slots, then the RAM tier, then less prefetch."""
    ok = [r for r in rows if r.error is None and r.tokens > 0]
    if not ok:
        raise OffloadMoeError("tune: no setting decoded any token (every one failed or ran out of time)")
    return max(ok, key=lambda r: (r.decode_tokens_per_second, -r.slots, r.tier == "ram", -r.prefetch))


def parse_settings(text: str) -> list[Setting]:
    """'2:0:ram,4:1:disk' -> settings (SLOTS:PREFETCH:TIER, comma-separated)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+):(\d+):(ram|disk)", part)
        if m is None:
            raise OffloadMoeError(f"setting {part!r}: expected SLOTS:PREFETCH:TIER such as 4:1:ram")
        out.append(Setting(int(m.group(1)), int(m.group(2)), m.group(3)))
    return out
