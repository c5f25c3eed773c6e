"""Tables of engine and generation statistics, shared by `generate --stats`, chat and bench."""

from __future__ import annotations

from rich.table import Table

from .console import human_bytes


PLACEMENT = {"resident": "all resident on the device", "cpu": "all in RAM, computed by the CPU"}


def stats_table(stats: dict, settings=None) -> Table:
    """`settings` (`Model.settings`): with no expert cache to count, say where the experts are instead."""
    table = Table(title="statistics", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    if not stats.get("experts") and settings is not None:
        where = PLACEMENT.get(settings.experts, settings.experts)
        table.add_row("experts", f"{where}: no cache, nothing moved")
    for section, values in stats.items():
        for key, value in values.items():
            if isinstance(value, (list, dict)):
                continue  # per-layer detail is in Model.stats
            if "bytes" in key and isinstance(value, (int, float)):
                shown = human_bytes(value)
            elif isinstance(value, float):
                shown = f"{value:.3f}"
            else:
                shown = str(value)
            table.add_row(f"{section}.{key}", shown)
    return table
