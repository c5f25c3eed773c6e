"""What the rows are measured against: the Belady hit rate (the best on demand, without prefetch) of the recorded routing, and each
row's lower bound of decode time: max(bytes copied while decoding ÷ peak copy rate, compute time),
the time if every copy overlapped compute perfectly (the engine does overlap them)."""

from __future__ import annotations

from ..experts.policy import LRU, Belady, simulate


def belady_rates(trace, slots: list[int]) -> dict:
    """Belady and LRU hit rates of a recorded engine trace (per layer, summed), for the given slots."""
    b_hits = l_hits = uses = 0
    for layer, steps in enumerate(trace):
        h, m = simulate(steps, slots[layer], Belady(steps))
        b_hits, uses = b_hits + h, uses + h + m
        l_hits += simulate(steps, slots[layer], LRU())[0]
    belady = b_hits / uses if uses else 0.0
    lru = l_hits / uses if uses else 0.0
    return {"belady_hit_rate": belady, "lru_hit_rate_simulated": lru,
            "lru_fraction_of_belady": lru / belady if belady > 0 else None}


def hit_rate_curve(trace, top_k: int, num_experts: int, points: int = 12) -> dict:
    """LRU and Belady hit rates of a recorded engine trace for a range of slots per layer (top_k to
    all experts), for `bench --plot`."""
    slots = sorted({round(top_k + (num_experts - top_k) * i / max(points - 1, 1)) for i in range(points)})
    curve = {"slots": slots, "lru": [], "belady": []}
    for k in slots:
        rates = belady_rates(trace, [k] * len(trace))
        curve["lru"].append(rates["lru_hit_rate_simulated"])
        curve["belady"].append(rates["belady_hit_rate"])
    return curve


def belady_summary(rows: dict, slots) -> dict:
    """The configured slots: Belady's hit rate, LRU's measured one (the lru row, else simulated), and the
    fraction."""
    out = {"slots": slots, "belady_hit_rate": None, "lru_hit_rate": None, "lru_fraction_of_belady": None,
           "from_row": None}
    for name in ("lru", "engine"):
        row = rows.get(name)
        if row and row["status"] == "ok" and row["belady_hit_rate"] is not None:
            lru = row["hit_rate"] if name == "lru" else row["lru_hit_rate_simulated"]
            out.update(belady_hit_rate=row["belady_hit_rate"], lru_hit_rate=lru, from_row=name,
                       lru_fraction_of_belady=lru / row["belady_hit_rate"] if row["belady_hit_rate"] > 0 else None)
            break
    return out


def add_bounds(rows: dict, compute: dict, peak_gbps: float, bytes_per_expert: int) -> None:
    """Each measured row's bound fields and ratio; `compute` is the compute reference (its
    decode_seconds None: transfer time only, no bound)."""
    bandwidth = peak_gbps * 1e9
    for row in rows.values():
        if row["status"] != "ok":
            continue
        moved = row["decode_bytes_moved"] or 0   # misses computed where they are (CPU experts) copy nothing
        row["bound_transfer_seconds"] = moved / bandwidth if bandwidth > 0 else None
        if compute["decode_seconds"] is not None and row["bound_transfer_seconds"] is not None:
            row["bound_compute_seconds"] = compute["decode_seconds"]
            row["bound_seconds"] = max(row["bound_transfer_seconds"], compute["decode_seconds"])
            row["ratio"] = row["decode_seconds"] / row["bound_seconds"] if row["bound_seconds"] > 0 else None
