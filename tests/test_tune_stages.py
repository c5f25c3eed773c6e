"""tune's search as small functions, run with a fake setting runner (no model loads): the stages
expand around the best row so far, a setting runs once, and past the deadline the rest are skipped."""

from __future__ import annotations

import time

from offload_moe.tune.settings import Row, Setting
from offload_moe.tune.trial import expand, explore_from, fill_row, run_stages

SPEED = {(2, 1, "ram"): 50.0, (4, 1, "ram"): 80.0, (8, 1, "ram"): 90.0, (4, 0, "ram"): 85.0,
         (4, 2, "ram"): 70.0, (4, 0, "disk"): 40.0}


def fake_run(s: Setting) -> Row:
    return Row(s.slots, s.prefetch, s.tier, tokens=7, decode_tokens_per_second=SPEED[(s.slots, s.prefetch, s.tier)])


def test_stages_expand_around_the_best_row_with_fewer_slots_than_experts():
    stages = [[Setting(2, 1, "ram"), Setting(4, 1, "ram"), Setting(8, 1, "ram"), Setting(4, 1, "ram")],
              "prefetch", "tier"]
    done = []
    rows, skipped = run_stages(stages, fake_run, num_experts=8, deadline=time.perf_counter() + 60, on_row=done.append)
    # 8 slots hold every expert, so prefetch and tier are explored from the best with fewer: 4 slots
    assert [(r.slots, r.prefetch, r.tier) for r in rows] == [
        (2, 1, "ram"), (4, 1, "ram"), (8, 1, "ram"), (4, 0, "ram"), (4, 2, "ram"), (4, 0, "disk")]
    assert skipped == 0 and done == [1, 2, 3, 4, 5, 6]
    assert explore_from(rows, 8).setting == Setting(4, 0, "ram")
    assert expand("tier", rows, 8, 1) == [Setting(4, 0, "disk")]


def test_past_the_deadline_only_the_first_setting_runs():
    stages = [[Setting(2, 1, "ram"), Setting(4, 1, "ram")], "prefetch"]
    rows, skipped = run_stages(stages, fake_run, num_experts=8, deadline=time.perf_counter() - 1, on_row=lambda d: None)
    assert [r.setting for r in rows] == [Setting(2, 1, "ram")] and skipped == 3


def test_a_row_reads_the_decode_alone_from_the_counters():
    class Timing:
        new_tokens, decode_seconds, decode_tokens_per_second = 9, 0.5, 16.0

    row = Row(2, 1, "ram")
    before = {"hits": 10, "misses": 5, "prefetch_issued": 4, "prefetch_used": 1, "bytes_moved": 100}
    after = {"hits": 40, "misses": 15, "prefetch_issued": 14, "prefetch_used": 9, "bytes_moved": 1100,
             "stall_seconds": 0.25}
    fill_row(row, after, before, Timing())
    assert (row.tokens, row.hit_rate, row.prefetch_accuracy, row.bytes_moved) == (8, 0.75, 0.8, 1000)
    assert row.stall_seconds == 0.25 and row.runs == [16.0]
