"""`bench --plot FILE.png`: two panels from a bench result. Left: hit rate against slots per layer on
the engine's recorded routing, LRU beside Belady's optimum, the configured slots marked. Right: each
row's decode speed (median, with its min-max over the runs) beside the speed its lower bound allows.
Needs matplotlib (the optional `plot` extra); drawn off-screen (Agg)."""

from __future__ import annotations

from pathlib import Path


def plot_bench(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    curve = result.get("hit_rate_curve")
    if curve:
        left.plot(curve["slots"], curve["belady"], "o-", label="Belady (best on demand)")
        left.plot(curve["slots"], curve["lru"], "s--", label="LRU")
        slots = result["belady"]["slots"]
        if isinstance(slots, int):
            left.axvline(slots, color="grey", linestyle=":", label=f"configured ({slots} slots)")
        left.set_ylim(0, 1.02)
        left.legend(loc="lower right")
    else:
        left.text(0.5, 0.5, "no offloaded engine row:\nno routing to replay", ha="center", va="center")
    left.set_xlabel("expert slots per layer")
    left.set_ylabel("hit rate")
    left.set_title("hit rate against slots (recorded routing)")

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    tokens = result["settings"]["tokens"]
    names = [r["name"] for r in rows]
    measured = [r["decode_tokens_per_second"] for r in rows]
    low = [r["decode_tokens_per_second"] - (r.get("decode_tokens_per_second_min") or r["decode_tokens_per_second"])
           for r in rows]
    high = [(r.get("decode_tokens_per_second_max") or r["decode_tokens_per_second"]) - r["decode_tokens_per_second"]
            for r in rows]
    bound = [(tokens - 1) / r["bound_seconds"] if r.get("bound_seconds") else 0.0 for r in rows]
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], measured, 0.4, yerr=[low, high], capsize=3, label="measured (median, min-max)")
    right.bar([i + 0.2 for i in x], bound, 0.4, label="bound allows", alpha=0.6)
    right.set_xticks(list(x), names, rotation=20)
    right.set_ylabel("decode tokens/s")
    right.set_title("decode speed against its lower bound")
    right.legend()
    fig.suptitle(f"{Path(result['model']['source']).name}: {result['device']['type']} ({result['device']['name']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
