"""The coordinator: owns the queue of units; workers pull, report, and lost workers' units go back."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from runner.inputs.units import Unit
from runner.output.store import UnitStats

# A worker beats each STALL_BEAT_S while its engine has gone that long without progress (and once more when it
# recovers), and at least each IDLE_BEAT_S otherwise: at 1,000 replicas, beats every second were two thirds of
# the coordinator's CPU (benchmarks/scale.py). Silence past the interval it promised counts as a stall, so a
# worker hung whole (its beat thread too) is still found.
STALL_BEAT_S = 1.0
IDLE_BEAT_S = 30.0
ADOPT_WAIT_S = 10.0  # how long a replacement coordinator waits for the lost one's workers to adopt their units
COUNTED = ("rows", "rows_ok", "rows_failed", "prompt_tokens", "completion_tokens")  # totals of committed units


class UnitState(Enum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    GAVE_UP = "gave_up"


@dataclass
class Track:
    """One unit's place in its lifecycle; only `Coordinator._move` changes `state`."""

    unit: Unit
    state: UnitState = UnitState.QUEUED
    attempts: int = 0
    holder: str | None = None  # the worker identity leasing it
    error: str | None = None  # the last failure, kept for a unit given up


class Phase(Enum):
    """Where a worker is, as its crash report says it."""

    LOADING = "while loading"
    FIRST_DECODE = "on its first decode"
    RUNNING = "running units"


@dataclass
class WorkerInfo:
    """What a worker tells of itself when it starts (where its crash log is, its node's CPU), and its phase."""

    node: str | None = None
    log: str | None = None
    cpu: str = "unknown"
    phase: Phase = Phase.LOADING
    held: tuple[str, ...] = ()  # filled in when asked: the units it holds


@dataclass(frozen=True)
class Lease:
    """The answer to a worker asking for work: units (each with its attempt number), `wait`, or `done`."""

    state: str  # "units" | "wait" | "done"
    units: tuple[Unit, ...] = ()
    attempts: tuple[int, ...] = ()


class Coordinator:
    """Runs as one Ray actor (no CPU reserved); every state change of a unit happens here.

    Workers are known by an identity that is never reused (a replacement gets a new one), so a call from a
    worker that was declared lost is refused instead of leasing units that nobody will run.
    Fresh units and retries wait in two queues. A unit on its second or later attempt runs alone: it goes
    only to a worker that holds nothing else, and that worker gets nothing more until it is settled; busy
    workers meanwhile keep taking fresh units. A unit that kills its worker every time then costs the units
    around it one attempt, not all of them.
    `attempts`, `gave_up` and `totals` carry a lost coordinator's state over to its replacement, and
    `awaiting` names the workers that outlived it: it leases nothing until each has adopted what it still
    holds (or been lost), for at most ADOPT_WAIT_S, so no unit a worker holds is leased to another. With
    `job`, it publishes the job's Ray metrics (runner.schedule.metrics).
    """

    def __init__(self, units: list[Unit], max_attempts: int, job: str | None = None,
                 attempts: dict[str, int] | None = None, gave_up: dict[str, str] | None = None,
                 totals: dict[str, int] | None = None, awaiting: Iterable[str] = ()):
        attempts, gave_up = attempts or {}, gave_up or {}
        self.awaiting, self.adopt_by = set(awaiting), time.time() + ADOPT_WAIT_S
        self.tracks = {u.id: Track(u, attempts=attempts.get(u.id, 0)) for u in units}
        self.counts: Counter = Counter({UnitState.QUEUED: len(units)})
        self.fresh: deque[str] = deque(u.id for u in units if not attempts.get(u.id))
        self.retries: deque[str] = deque(u.id for u in units if attempts.get(u.id))
        self.holding: dict[str, set[str]] = {}  # worker identity -> unit ids it leases
        self.lost: set[str] = set()
        self.tried: set[str] = {uid for uid, n in attempts.items() if n and uid in self.tracks}  # not done
        self.beats: dict[str, tuple[float, float]] = {}  # worker -> (received at, seconds without progress)
        self.max_attempts = max_attempts
        self.totals: Counter = Counter({k: totals[k] for k in COUNTED if k in totals} if totals else {})
        self.done_by_pool: Counter = Counter()
        self.stats: list[UnitStats] = []  # what this coordinator's workers committed
        self.last_error: str | None = None
        self.times: dict[str, float] = {}  # when the first unit was leased, the first and the last committed
        self.loads: dict[str, float] = {}  # worker -> seconds its engine took to load
        self.workers: dict[str, WorkerInfo] = {}  # worker -> what it told of itself
        self.draining: set[str] = set()  # nodes being drained: their workers take no more units
        self.metrics = None
        if job is not None:
            from runner.schedule.metrics import JobMetrics

            self.metrics = JobMetrics(job)
        for uid, error in gave_up.items():
            if uid in self.tracks:
                self._give_up(self.tracks[uid], error)

    def _move(self, track: Track, state: UnitState, holder: str | None = None, front: bool = False) -> None:
        """The one place a unit changes state (and holder); `front`: queued ahead of the others."""
        if track.holder is not None:
            self.holding.get(track.holder, set()).discard(track.unit.id)
        self.counts[track.state] -= 1
        self.counts[state] += 1
        track.state, track.holder = state, holder
        if holder is not None:
            self.holding.setdefault(holder, set()).add(track.unit.id)
        if state is UnitState.QUEUED:
            queue = self.retries if track.attempts else self.fresh
            queue.appendleft(track.unit.id) if front else queue.append(track.unit.id)

    def _lease(self, worker: str, track: Track, attempt: int | None = None) -> None:
        """Lease on a new attempt, or (`attempt`) on the one a surviving worker is already running."""
        track.attempts = track.attempts + 1 if attempt is None else max(track.attempts, attempt)
        self.tried.add(track.unit.id)
        self._move(track, UnitState.LEASED, worker)

    def _next_queued(self, queue: deque[str]) -> Track | None:
        """The queue's first unit still queued (entries of units settled since are dropped)."""
        while queue:
            track = self.tracks[queue[0]]
            if track.state is UnitState.QUEUED:
                return track
            queue.popleft()
        return None

    def next_units(self, worker: str, count: int = 1) -> Lease:
        """Up to `count` units, consecutive in the plan, so a pool with large leases reads long runs of a file."""
        if worker in self.lost:
            return Lease("done")  # a replaced worker's late call: it must not take units
        if self.draining and self.workers.get(worker, WorkerInfo()).node in self.draining:
            return Lease("done")  # its node goes away: it finishes what it holds and ends
        if self.awaiting and time.time() < self.adopt_by:
            return Lease("wait")  # a lost coordinator's workers have yet to say what they hold
        held = self.holding.get(worker, set())
        if any(self.tracks[uid].attempts > 1 for uid in held):
            return Lease("wait")  # it is running a retry, alone
        retry = self._next_queued(self.retries)
        units: list[Track] = []
        if retry is not None and not held:
            self.retries.popleft()
            units = [retry]
        else:
            while len(units) < count and (track := self._next_queued(self.fresh)) is not None:
                self.fresh.popleft()
                units.append(track)
        if units:
            for track in units:
                self._lease(worker, track)
            self.times.setdefault("first_lease", time.time())
            return Lease("units", tuple(t.unit for t in units), tuple(t.attempts for t in units))
        return Lease("done") if self.finished() else Lease("wait")

    def adopt(self, worker: str, held: list[tuple[str, int]]) -> None:
        """A worker of a lost coordinator reports what it is still running, so it is not handed out again."""
        self.awaiting.discard(worker)
        for uid, attempt in held:
            track = self.tracks.get(uid)
            if track is not None and track.state is UnitState.QUEUED and worker not in self.lost:
                self._lease(worker, track, attempt)

    def complete(self, worker: str, stats: UnitStats) -> None:
        """The unit is committed (its marker is written): done, whoever reports it."""
        track = self.tracks.get(stats.unit_id)
        if track is None or track.state is UnitState.DONE:
            return
        if track.state is UnitState.GAVE_UP:  # a late commit beat the driver's failed rows to it
            self.totals["rows_given_up"] -= track.unit.num_rows
        self._move(track, UnitState.DONE)
        self.tried.discard(track.unit.id)
        self.times.setdefault("first_commit", time.time())
        self.times["last_commit"] = time.time()
        self.stats.append(stats)
        self.done_by_pool[stats.pool] += 1
        self.totals.update({k: getattr(stats, k) for k in COUNTED})
        if self.metrics:
            self.metrics.unit_committed(stats)

    def complete_all(self, worker: str, stats: list[UnitStats]) -> None:
        """Several units committed, reported in one call."""
        for s in stats:
            self.complete(worker, s)

    def fail(self, worker: str, unit_id: str, error: str) -> None:
        track = self.tracks.get(unit_id)
        if track is not None and track.state is UnitState.LEASED and track.holder == worker:
            self._retry_or_give_up(track, error)

    def hand_back(self, worker: str, unit_ids: list[str]) -> None:
        """A worker gives back units it leased and never started (its node is going away): they are queued
        first, with no attempt counted."""
        for uid in unit_ids:
            track = self.tracks.get(uid)
            if track is not None and track.state is UnitState.LEASED and track.holder == worker:
                self._unlease(track)

    def _unlease(self, track: Track) -> None:
        """Back to the front of its queue as if never leased: neither the unit nor its worker was at fault."""
        track.attempts -= 1
        if not track.attempts:
            self.tried.discard(track.unit.id)
        self._move(track, UnitState.QUEUED, front=True)

    def drain(self, nodes: list[str]) -> None:
        """The workers on `nodes` take no more units from now on (Ray drains those nodes)."""
        self.draining.update(nodes)

    def workers_on(self, nodes: list[str]) -> list[str]:
        """The workers, not yet lost, that said they run on one of `nodes`."""
        on = set(nodes)
        return sorted(w for w, info in self.workers.items() if info.node in on and w not in self.lost)

    def worker_lost(self, worker: str, how: str, blameless: bool = False) -> list[str]:
        """Refuse the worker from now on; requeue (or give up on) every unit it held; returns their ids.
        `how` completes "worker W ...": `lost: <Ray's error>`, `crashed (SIGSEGV)`. `blameless` (its node was
        lost): its units are queued first, with no attempt counted, for the other workers to take at once."""
        self.lost.add(worker)
        self.awaiting.discard(worker)
        self.beats.pop(worker, None)
        held = sorted(self.holding.pop(worker, set()))
        for uid in reversed(held) if blameless else held:  # either way the queue keeps plan order
            track = self.tracks[uid]
            if blameless:
                self.last_error = f"worker {worker} {how}"
                self._unlease(track)
            else:
                self._retry_or_give_up(track, f"worker {worker} {how}")
        return held

    def starting(self, worker: str, info: WorkerInfo) -> None:
        """A worker is up and loads its engine."""
        self.workers[worker] = info

    def loaded(self, worker: str, seconds: float) -> None:
        """A worker's engine has loaded, in `seconds` (the driver's timings show it); its warm-up decode is next."""
        self.loads[worker] = seconds
        self._phase(worker, Phase.FIRST_DECODE)

    def ready(self, worker: str) -> None:
        """A worker's warm-up decode is done: it takes units from now on."""
        self._phase(worker, Phase.RUNNING)

    def _phase(self, worker: str, phase: Phase) -> None:
        self.workers.setdefault(worker, WorkerInfo()).phase = phase

    def worker_info(self, worker: str) -> WorkerInfo:
        """What the worker told of itself, its phase and the units it holds (asked before `worker_lost`)."""
        info = self.workers.get(worker, WorkerInfo())
        return WorkerInfo(info.node, info.log, info.cpu, info.phase, tuple(sorted(self.holding.get(worker, ()))))

    def timings(self) -> dict:
        """When the job's phases turned (wall clock) and each worker's load seconds."""
        return {**self.times, "load_s": dict(self.loads)}

    def beat(self, worker: str, stalled_s: float) -> None:
        """A loaded worker's heartbeat: how long its engine has had work in flight without progress."""
        if worker not in self.lost:
            self.beats[worker] = (time.time(), stalled_s)

    def _retry_or_give_up(self, track: Track, error: str) -> None:
        self.last_error = error
        if track.attempts >= self.max_attempts:
            self._give_up(track, error)
        else:
            self._move(track, UnitState.QUEUED)

    def _give_up(self, track: Track, error: str) -> None:
        track.error = error
        self._move(track, UnitState.GAVE_UP)
        self.totals["rows_given_up"] += track.unit.num_rows
        if self.metrics:
            self.metrics.unit_given_up(track.unit.num_rows)

    def finished(self) -> bool:
        return not self.counts[UnitState.QUEUED] and not self.counts[UnitState.LEASED]

    def given_up(self) -> list[tuple[Unit, str]]:
        return [(self.tracks[uid].unit, self.tracks[uid].error or "") for uid in sorted(self.tried)
                if self.tracks[uid].state is UnitState.GAVE_UP]

    def committed(self) -> list[UnitStats]:
        return self.stats

    def committed_since(self, start: int) -> list[UnitStats]:
        """The units committed after the first `start` this coordinator was told of, in the order told."""
        return self.stats[start:]

    def progress(self) -> dict:
        """Counts and totals, each worker's seconds without progress, and what a replacement coordinator
        would need: the attempts of every unit not done and the errors of those given up."""
        c = self.counts
        if self.metrics:
            self.metrics.refresh(c[UnitState.LEASED], c[UnitState.QUEUED], c[UnitState.DONE])
        now = time.time()
        return {
            "units_total": len(self.tracks), "units_done": c[UnitState.DONE],
            "units_given_up": c[UnitState.GAVE_UP], "units_in_flight": c[UnitState.LEASED],
            "units_queued": c[UnitState.QUEUED], "finished": self.finished(), "last_error": self.last_error,
            "done_by_pool": dict(self.done_by_pool),
            "stalled_s": {w: stalled_s(at, s, now) for w, (at, s) in self.beats.items()},
            "attempts": {uid: self.tracks[uid].attempts for uid in self.tried},
            "gave_up": {uid: self.tracks[uid].error for uid in self.tried
                        if self.tracks[uid].state is UnitState.GAVE_UP},
            **self.totals,
        }


def stalled_s(at: float, stalled: float, now: float) -> float:
    """How long a worker's engine has gone without progress, from its last beat (sent at `at`, saying
    `stalled`): a stalling worker's silence since counts whole, a healthy one's only past IDLE_BEAT_S."""
    return stalled + max(0.0, now - at - (0.0 if stalled >= STALL_BEAT_S else IDLE_BEAT_S))
