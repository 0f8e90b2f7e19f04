"""The coordinator: owns the queue of units; workers pull, report, and lost workers' units go back."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from runner.plan import Unit


@dataclass(frozen=True)
class Lease:
    """The answer to a worker asking for work: units (each with its attempt number), `wait`, or `done`."""

    state: str  # "units" | "wait" | "done"
    units: tuple[Unit, ...] = ()
    attempts: tuple[int, ...] = ()


class Coordinator:
    """Runs as one Ray actor (no CPU reserved); every state change of a unit happens here.

    A unit on its second or later attempt runs alone: it goes only to a worker that holds nothing else,
    and that worker gets nothing more until it is settled. A unit that kills its worker every time then
    costs the units around it one attempt, not all of them.
    With `job`, it publishes the job's Ray metrics (runner.metrics).
    """

    def __init__(self, units: list[Unit], max_attempts: int, job: str | None = None):
        self.by_id = {u.id: u for u in units}
        self.pending: deque[Unit] = deque(units)
        self.leases: dict[str, str] = {}  # unit id -> worker
        self.attempts: Counter = Counter()
        self.done: set[str] = set()
        self.gave_up: dict[str, str] = {}  # unit id -> last error
        self.max_attempts = max_attempts
        self.totals: Counter = Counter()
        self.last_error: str | None = None
        self.metrics = None
        if job is not None:
            from runner.metrics import JobMetrics

            self.metrics = JobMetrics(job)

    def next_units(self, worker: str, count: int = 1) -> Lease:
        """Up to `count` units, consecutive in the plan, so a pool with large leases reads long runs of a file."""
        held = [uid for uid, w in self.leases.items() if w == worker]
        if any(self.attempts[uid] > 1 for uid in held):
            return Lease("wait")  # it is running a retry, alone
        if self.pending:
            if self.attempts[self.pending[0].id]:  # a retry: alone, and only on an idle worker
                if held:
                    return Lease("wait")
                units = [self.pending.popleft()]
            else:  # fresh units, up to the next retry
                units = []
                while self.pending and len(units) < count and not self.attempts[self.pending[0].id]:
                    units.append(self.pending.popleft())
            for unit in units:
                self.leases[unit.id] = worker
                self.attempts[unit.id] += 1
            return Lease("units", tuple(units), tuple(self.attempts[u.id] for u in units))
        return Lease("wait") if self.leases else Lease("done")

    def complete(self, worker: str, unit_id: str, totals: dict, pool: str = "") -> None:
        self.leases.pop(unit_id, None)
        if unit_id not in self.done:
            self.done.add(unit_id)
            self.totals.update(totals)
            if self.metrics:
                self.metrics.unit_committed(pool, totals)

    def fail(self, worker: str, unit_id: str, error: str) -> None:
        if self.leases.get(unit_id) == worker:
            del self.leases[unit_id]
            self._retry_or_give_up(unit_id, error)

    def worker_lost(self, worker: str, error: str) -> list[str]:
        """Requeue (or give up on) every unit the worker held; returns their ids."""
        held = [uid for uid, w in self.leases.items() if w == worker]
        for uid in reversed(held):  # each goes to the queue's head: reversed keeps them in plan order
            del self.leases[uid]
            self._retry_or_give_up(uid, f"worker {worker} lost: {error}")
        return held

    def _retry_or_give_up(self, unit_id: str, error: str) -> None:
        self.last_error = error
        if unit_id in self.done:
            return
        if self.attempts[unit_id] >= self.max_attempts:
            self.gave_up[unit_id] = error
            self.totals["rows_given_up"] += self.by_id[unit_id].num_rows
            if self.metrics:
                self.metrics.unit_given_up(self.by_id[unit_id].num_rows)
        else:
            self.pending.appendleft(self.by_id[unit_id])

    def given_up(self) -> list[tuple[Unit, str]]:
        return [(self.by_id[uid], err) for uid, err in sorted(self.gave_up.items())]

    def progress(self) -> dict:
        if self.metrics:
            self.metrics.refresh(len(self.leases), len(self.pending), len(self.done))
        return {
            "units_total": len(self.by_id), "units_done": len(self.done), "units_given_up": len(self.gave_up),
            "units_in_flight": len(self.leases), "units_queued": len(self.pending),
            "finished": not self.pending and not self.leases, "last_error": self.last_error, **self.totals,
        }
