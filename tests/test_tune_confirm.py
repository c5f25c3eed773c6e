"""tune on a busy machine: a setting that won one lucky run is re-measured against the default, and the
profile never keeps a setting whose median is slower than the default's."""

from __future__ import annotations

import time

from offload_moe.tune.search import confirm_against_default
from offload_moe.tune.settings import Row, Setting


def row(slots, tps):
    return Row(slots, 0, "ram", tokens=8, decode_tokens_per_second=tps, runs=[tps])


def scripted(speeds: dict):
    """run_one that returns the next scripted speed for each setting."""
    def run_one(setting: Setting) -> Row:
        return row(setting.slots, speeds[setting.slots].pop(0))
    return run_one


def test_a_lucky_winner_loses_to_the_default_on_re_measurement():
    lucky, default = row(2, 100.0), row(8, 50.0)
    notes = []
    best = confirm_against_default([lucky, default], lucky, Setting(8, 0, "ram"),
                                   scripted({2: [40.0, 41.0], 8: [52.0, 49.0]}), rounds=2,
                                   deadline=time.perf_counter() + 60, notes=notes)
    assert best is default and best.runs == [50.0, 52.0, 49.0] and best.decode_tokens_per_second == 50.0
    assert lucky.decode_tokens_per_second == 41.0          # median of 100, 40, 41
    assert "keeps the default" in notes[0]


def test_a_real_winner_stays():
    fast, default = row(2, 100.0), row(8, 50.0)
    best = confirm_against_default([fast, default], fast, Setting(8, 0, "ram"),
                                   scripted({2: [95.0, 99.0], 8: [52.0, 49.0]}), rounds=2,
                                   deadline=time.perf_counter() + 60, notes=[])
    assert best is fast and best.decode_tokens_per_second == 99.0


def test_the_default_itself_or_no_default_needs_no_re_measurement():
    only = row(8, 50.0)
    assert confirm_against_default([only], only, Setting(8, 0, "ram"), None, rounds=2,
                                   deadline=time.perf_counter() + 60, notes=[]) is only
    other = row(2, 60.0)
    assert confirm_against_default([other], other, None, None, rounds=2, deadline=0, notes=[]) is other
