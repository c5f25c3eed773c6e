"""Repeated, interleaved rows on a busy machine: every row runs once per round (engine, resident, ...,
then again), so a burst of load hits all rows alike rather than one; each row reports its median run
with the spread of the runs, and a warning says when the spread makes the figures untrustworthy.

The lower bound stays a lower bound under noise because both of its terms come from the fastest
thing this run saw: the compute term is (tokens - 1) x the fastest decode step of any run of any row,
the transfer term uses the highest copy rate seen (memcpy trials over every round, and every row's own
decode copies). So no row's decode time can be below it (see bounds.add_bounds)."""

from __future__ import annotations

import statistics

TIMINGS = ("decode_tokens_per_second", "decode_seconds", "prefill_tokens_per_second", "ttft_seconds")
SPREAD_WARNING = 0.25      # (max - min) / median of a row's decode tok/s beyond which figures are noise
MEMCPY_WARNING = 2.0       # memcpy peak / median trial beyond which the copy rate is noise


def combine(runs: list[dict]) -> dict:
    """One row from its runs: the median run (by decode time; with an even count the faster middle one,
    a real run so every field agrees), plus each timing's values over the runs and the spread."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return runs[-1]
    ordered = sorted(ok, key=lambda r: r["decode_seconds"] or 0.0)
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["runs"] = {k: [r[k] for r in ok] for k in TIMINGS}
    row["repeats"] = len(ok)
    tps = [v for v in row["runs"]["decode_tokens_per_second"] if v]
    med = statistics.median(tps) if tps else 0.0
    row["decode_tokens_per_second_min"] = min(tps) if tps else None
    row["decode_tokens_per_second_max"] = max(tps) if tps else None
    row["spread"] = (max(tps) - min(tps)) / med if tps and med > 0 else None
    return row


def fastest_step(runs: list[dict]) -> float | None:
    steps = [r["decode_step_min_seconds"] for r in runs
             if r["status"] == "ok" and r.get("decode_step_min_seconds") is not None]
    return min(steps) if steps else None


def fastest_copy_gbps(runs: list[dict]) -> float | None:
    """The highest decode copy rate of any run (bytes moved while decoding / time spent copying)."""
    rates = [r["decode_bytes_moved"] / r["decode_copy_seconds"] / 1e9 for r in runs
             if r["status"] == "ok" and r.get("decode_copy_seconds") and r.get("decode_bytes_moved")]
    return max(rates) if rates else None


def merge_memcpy(rounds: list[dict]) -> dict:
    """memcpy measured once per round: the peak over every trial of every round."""
    trials = [g for m in rounds for g in m["trial_gbps"]]
    out = dict(rounds[0])
    out.update(rounds=len(rounds), trial_gbps=trials, peak_gbps=max(trials), median_gbps=statistics.median(trials),
               memcpy_peak_gbps=max(trials))
    return out


def warnings(rows: list[dict], memcpy: dict) -> list[str]:
    out = []
    for r in rows:
        if r["status"] == "ok" and r.get("spread") is not None and r["spread"] > SPREAD_WARNING:
            out.append(f"{r['label']}: decode tok/s ranged {r['decode_tokens_per_second_min']:.2f}-"
                       f"{r['decode_tokens_per_second_max']:.2f} over {r['repeats']} runs "
                       f"(spread {r['spread']:.0%}): the machine is busy and this row's speed is not trustworthy; "
                       "rerun on a quiet machine, with --threads 1 or more --repeats")
    if memcpy["median_gbps"] > 0 and memcpy["memcpy_peak_gbps"] / memcpy["median_gbps"] > MEMCPY_WARNING:
        out.append(f"memcpy trials ranged {min(memcpy['trial_gbps']):.2f}-{memcpy['memcpy_peak_gbps']:.2f} GB/s "
                   f"(median {memcpy['median_gbps']:.2f}): the copy rate is noisy; the bound uses the peak")
    return out
