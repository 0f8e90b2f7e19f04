"""The driver's view of a running job: a progress bar on a terminal, a log line every 10 s otherwise, and
where a run's seconds went."""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger(__name__)

TIMINGS_ENV = "RUNNER_TIMINGS"  # set (to anything but 0 or empty): the timings line is logged at INFO


class Timings:
    """A run's phases, each ending at its `mark`, for one log line at the end: at INFO when RUNNER_TIMINGS is
    set, else at DEBUG (`runner -v`). The first phase starts when the process did (on Linux; elsewhere when
    this object was made), so the interpreter's start and the imports count."""

    def __init__(self):
        self.marks: list[tuple[str, float]] = [("", _process_started())]
        self.events: list[dict] = []  # the cluster's events during the run (runner.cluster.supervisor)

    def mark(self, phase: str, at: float | None = None) -> None:
        """`phase` ended `at` (wall clock; default now). Marks given out of order count as zero-length."""
        self.marks.append((phase, time.time() if at is None else at))

    def mark_phases(self, times: dict) -> None:
        """The coordinator's view of the run (its `timings`), as phases: workers starting and loading their
        engines until the first lease, the first unit, the rest of the units, then the driver noticing the end."""
        loads = times.get("load_s") or {}
        load = f" (engine load {max(loads.values()):.2f}s)" if loads else ""
        for phase, key in ((f"workers up{load}", "first_lease"), ("first unit", "first_commit"),
                           ("units", "last_commit")):
            if key in times:
                self.mark(phase, times[key])
        self.mark("end seen")

    def line(self) -> str:
        ends, parts = self.marks[0][1], []
        for phase, at in self.marks[1:]:
            parts.append(f"{phase} {max(0.0, at - ends):.2f}s")
            ends = max(ends, at)
        return f"timings: {', '.join(parts)}; total {ends - self.marks[0][1]:.2f}s"

    def log(self) -> None:
        wanted = os.environ.get(TIMINGS_ENV, "") not in ("", "0")
        log.log(logging.INFO if wanted else logging.DEBUG, "%s", self.line())


def _process_started() -> float:
    """When this process started, from Linux's /proc (to the clock tick); elsewhere, now."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = float(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            booted = time.time() - float(uptime.read().split()[0])
    except (OSError, IndexError, ValueError):
        return time.time()
    return booted + ticks / os.sysconf("SC_CLK_TCK")


class Progress:
    """A rich progress bar on a terminal; a log line every 10 s otherwise."""

    def __init__(self, rows_total: int, enabled: bool):
        self.rows_total, self.enabled = rows_total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self.started = self.last_log = time.time()

    def __enter__(self):
        if self.tty:
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

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
