"""One tune setting's run (`Trial.run`: load under the setting, warm up, decode greedily until the
tokens or the deadline, read the engine's counters), and the stages of the search run in order."""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..api.loader import load
from ..placement.options import Placement
from ..base.runtime import Progress
from .settings import Row, Setting, pick_best


@dataclass
class Trial:
    """What every setting's run shares."""
    ckpt: object
    device: torch.device
    prompt: list[int]
    tokens: int                  # decoded per setting (the first, from the prompt, not counted)
    placement: Placement         # each setting's placement is `Setting.placement(this)`
    costs: object                # the hybrid's cost model from the measurements (or None)
    setting_seconds: float       # one setting's decode deadline
    deadline: float              # the whole run's (perf_counter time)
    scratch: Path | None         # where disk tiers are made (None: the temp dir)
    report: Progress

    def run(self, s: Setting) -> Row:
        row = Row(s.slots, s.prefetch, s.tier)
        tier_dir = Path(tempfile.mkdtemp(prefix="offload-moe-tune-", dir=self.scratch)) if s.tier == "disk" else None
        model = None
        try:
            t0 = time.perf_counter()
            placed = s.placement(self.placement).override(offload_dir=tier_dir, cpu_costs=self.costs)
            # profile=None: the placement is the whole plan; threads: the ones tune was told, not "auto"
            model = load(self.ckpt, placed, device=self.device, profile=None, threads=None)
            row.load_seconds = time.perf_counter() - t0
            # warm-up: first-call allocations and a cache that has seen a prompt
            model.generate(self.prompt, max_new_tokens=2, temperature=0, ignore_eos=True)
            model.experts.reset_stats()
            self.decode(model, row)
            return row
        except torch.cuda.OutOfMemoryError:
            row.error = "out of device memory"
            return row
        finally:
            model = None  # noqa: F841 (drop the engine's buffers before the next load)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if tier_dir is not None:
                shutil.rmtree(tier_dir, ignore_errors=True)

    def decode(self, model, row: Row) -> None:
        """Decode `tokens` greedily (at least 3, then until the setting's deadline) and fill `row` from
        the timing and the engine's counters over the decode alone."""
        marks: dict = {}
        stop_at = min(time.perf_counter() + self.setting_seconds, self.deadline)

        def should_stop() -> bool:  # called after each token
            if not marks:  # the first call: the prompt is done, decode starts now
                marks["before"] = model.experts.stats()
            marks["tokens"] = n = marks.get("tokens", 0) + 1
            self.report("decode", n, self.tokens)
            if n >= 3 and time.perf_counter() > stop_at:
                row.timed_out = True
                return True
            return False

        model.generate(self.prompt, max_new_tokens=self.tokens, temperature=0, ignore_eos=True,
                       should_stop=should_stop)
        fill_row(row, model.experts.stats(), marks.get("before", {}), model.last_timing)


def fill_row(row: Row, after: dict, before: dict, timing) -> None:
    """A row's figures from the engine's counters before and after the decode, and its timing."""
    def delta(key: str):
        return after.get(key, 0) - before.get(key, 0)

    hits, misses = delta("hits"), delta("misses")
    issued, used = delta("prefetch_issued"), delta("prefetch_used")
    row.tokens = max(timing.new_tokens - 1, 0)
    row.decode_seconds = timing.decode_seconds
    row.decode_tokens_per_second = timing.decode_tokens_per_second
    row.hit_rate = hits / (hits + misses) if hits + misses else 0.0
    row.bytes_moved = delta("bytes_moved")
    row.stall_seconds = delta("stall_seconds")
    row.prefetch_accuracy = used / issued if issued else 0.0
    row.runs = [row.decode_tokens_per_second]


def explore_from(rows: list[Row], num_experts: int) -> Row:
    """The best row so far; if it holds every expert in a slot (nothing is copied while decoding, so
    prefetch and tier cannot matter), the best with fewer slots, where they do."""
    b = pick_best(rows)
    fewer = [r for r in rows if r.slots < num_experts and r.error is None and r.tokens > 0]
    return pick_best(fewer) if b.slots == num_experts and fewer else b


def expand(stage, rows: list[Row], num_experts: int, first_prefetch: int) -> list[Setting]:
    """A stage's settings: given ones as they are; "prefetch" (the other depths) and "tier" (disk) around
    the best row so far."""
    if stage == "prefetch":
        b = explore_from(rows, num_experts)
        return [Setting(b.slots, d, "ram") for d in (0, 1, 2) if d != first_prefetch]
    if stage == "tier":
        b = explore_from(rows, num_experts)
        return [Setting(b.slots, b.prefetch, "disk")]
    return stage


def run_stages(stages: list, run: Callable[[Setting], Row], num_experts: int, deadline: float,
               on_row: Callable[[int], None]) -> tuple[list[Row], int]:
    """Every stage's settings in order, each once; past `deadline` the rest are skipped (the first
    always runs). Returns (rows, skipped); `on_row(done)` after each."""
    rows: list[Row] = []
    skipped = 0
    first_prefetch = stages[0][0].prefetch
    for stage in stages:
        for s in expand(stage, rows, num_experts, first_prefetch):
            if any(r.setting == s for r in rows):
                continue
            if rows and time.perf_counter() > deadline:
                skipped += 1
                continue
            rows.append(run(s))
            on_row(len(rows) + skipped)
    return rows, skipped
