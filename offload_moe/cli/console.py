"""Where CLI output goes: results on stdout, logs and progress on stderr. With NO_COLOR set (to
anything non-empty) or output that is not a terminal, nothing is styled: no colour, bold, dim or
italic (rich alone drops only the colours)."""

from __future__ import annotations

import os
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from ..base.runtime import fmt_bytes, fmt_count


def _console(**kwargs) -> Console:
    probe = Console(**kwargs)
    plain = bool(os.environ.get("NO_COLOR")) or not probe.is_terminal
    return Console(color_system=None, **kwargs) if plain else probe


stdout = _console(soft_wrap=True)
stderr = _console(stderr=True, soft_wrap=True)


@contextmanager
def progress_bar():
    """A rich progress display on stderr; yields a callback `(what, done, total)` for the library."""
    if not stderr.is_terminal:  # a log file or pipe gets no bar (and no stray blank line)
        yield lambda what, done, total: None
        return
    columns = [TextColumn("{task.description:<14}"), BarColumn(), TextColumn("{task.fields[amount]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=stderr, transient=True) as bar:
        tasks: dict[str, int] = {}

        def report(what: str, done: int, total: int):
            amount = f"{human_bytes(done)}/{human_bytes(total)}" if what == "download" else f"{done}/{total}"
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total, amount=amount)
            bar.update(tasks[what], completed=done, total=total, amount=amount)

        yield report


def byte_progress_columns():
    return [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn()]


human_bytes = fmt_bytes  # one formatter for the whole package (runtime.fmt_bytes)
human_count = fmt_count  # and one for counts (runtime.fmt_count), so `info` and `plan` agree
