"""The driver's view of a running job: a progress bar on a terminal, a log line every 10 s otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    """A rich progress bar on a terminal; a log line every 10 s otherwise."""

    def __init__(self, rows_total: int, enabled: bool):
        self.rows_total, self.enabled = rows_total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self.started = self.last_log = time.time()

    def __enter__(self):
        if self.tty:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                    TextColumn("{task.completed}/{task.total} rows"),
                                    TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("generating", total=self.rows_total, tps="0")
        return self

    def update(self, p: dict) -> None:
        tps = p.get("completion_tokens", 0) / max(time.time() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, completed=p.get("rows", 0), tps=f"{tps:.0f}")
        elif self.enabled and time.time() - self.last_log >= 10:
            self.last_log = time.time()
            log.info("units %d/%d, rows %d/%d (%d failed), %.0f tok/s", p["units_done"], p["units_total"],
                     p.get("rows", 0), self.rows_total, p.get("rows_failed", 0), tps)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
