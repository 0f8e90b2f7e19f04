"""Live job metrics through `ray.util.metrics`. Ray's metrics agent on each node serves them to
Prometheus as `ray_runner_*` (the Ray dashboard's Metrics view graphs them with Grafana)."""

from __future__ import annotations

import time
from collections import deque

WINDOW_S = 30.0  # tokens/s per pool is over this much recent time


class JobMetrics:
    """Owned by the coordinator, which sees every committed unit and the whole queue."""

    def __init__(self, job: str):
        from ray.util.metrics import Counter, Gauge

        self.job = job
        by_pool = ("job", "pool")
        self.rows_done = Counter("runner_rows_done", "Rows committed, ok or failed.", tag_keys=by_pool)
        self.rows_failed = Counter("runner_rows_failed", "Rows committed with an error.", tag_keys=by_pool)
        self.prompt_tokens = Counter("runner_prompt_tokens", "Prompt tokens of committed rows.", tag_keys=by_pool)
        self.generated_tokens = Counter("runner_generated_tokens", "Generated tokens of committed rows.",
                                        tag_keys=by_pool)
        self.tokens_per_s = Gauge("runner_tokens_per_s", f"Generated tokens/s over the last {WINDOW_S:.0f} s.",
                                  tag_keys=by_pool)
        self.in_flight = Gauge("runner_units_in_flight", "Units leased to workers.", tag_keys=("job",))
        self.queued = Gauge("runner_queue_depth", "Units waiting for a worker.", tag_keys=("job",))
        self.done = Gauge("runner_units_done", "Units committed in this run.", tag_keys=("job",))
        self.recent: dict[str, deque[tuple[float, int]]] = {}
        self.started = time.time()

    def unit_committed(self, stats) -> None:
        """Count one committed unit's rows and tokens (`stats`: its runner.output.UnitStats)."""
        tags = {"job": self.job, "pool": stats.pool}
        for counter, value in ((self.rows_done, stats.rows), (self.rows_failed, stats.rows_failed),
                               (self.prompt_tokens, stats.prompt_tokens),
                               (self.generated_tokens, stats.completion_tokens)):
            if value > 0:  # Ray's Counter.inc refuses 0 (an embedding unit generates no tokens)
                counter.inc(value, tags=tags)
        self.recent.setdefault(stats.pool, deque()).append((time.time(), stats.completion_tokens))

    def unit_given_up(self, rows: int) -> None:
        """Its rows are written as failed by the driver at the end; they count from now."""
        tags = {"job": self.job, "pool": "-"}
        if rows > 0:
            self.rows_done.inc(rows, tags=tags)
            self.rows_failed.inc(rows, tags=tags)

    def refresh(self, in_flight: int, queued: int, done: int) -> None:
        """The gauges, from the queue's state now and the last WINDOW_S of commits."""
        tags = {"job": self.job}
        self.in_flight.set(in_flight, tags=tags)
        self.queued.set(queued, tags=tags)
        self.done.set(done, tags=tags)
        now = time.time()
        span = max(min(WINDOW_S, now - self.started), 1e-3)
        for pool, recent in self.recent.items():
            while recent and recent[0][0] < now - WINDOW_S:
                recent.popleft()
            self.tokens_per_s.set(sum(t for _, t in recent) / span, tags={"job": self.job, "pool": pool})
