"""The worker: a thin Ray actor shell around one engine, reading units ahead and committing them behind."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections import deque

from runner.engines.build import create_engine, load_error, warm_up
from runner.errors import FencedError, RunnerError
from runner.hardware import cpu_flags, describe_cpu
from runner.inputs.reader import open_reader
from runner.inputs.units import UnitWork
from runner.output.store import OutputStore
from runner.schedule.coordinator import IDLE_BEAT_S, STALL_BEAT_S, WorkerInfo
from runner.spec.job import JobSpec
from runner.storage.location import prime_parquet
from runner.worker.batching import END, BatchLoop
from runner.worker.crashes import unwatch_crashes, watch_crashes

log = logging.getLogger(__name__)

COMMITS_PENDING = 2  # finished units waiting for the store before the engine loop waits too
SENDS_PENDING = 8  # reports of committed units sent to the coordinator and not yet acknowledged
REPORT_EVERY = 8  # a busy writer reports committed units to the coordinator at least this often
LEASE_AHEAD_S = 0.05  # a fast engine leases about this much of its work at once ...
LEASE_MAX = 16  # ... but at most this many times the pool's units per lease
PACE_UNITS = 8  # ... judged by how fast the engine loop took its last this many units
WAIT_S = (0.02, 0.2)  # a worker told to wait asks again after 20 ms, backing off to 0.2 s
REFIND_S = 120.0  # how long a worker waits for the driver to replace a lost coordinator


class CoordinatorGone(RunnerError):
    """The coordinator was lost and no replacement came."""


class CoordinatorLink:
    """The worker's handle on the coordinator. When the coordinator is lost, the driver starts another under
    the same name; the link finds it, tells it which units this worker still holds, and retries the call."""

    def __init__(self, handle, name: str, namespace: str, worker: str, held):
        self.handle, self.name, self.namespace, self.worker, self.held = handle, name, namespace, worker, held
        self.lock = threading.Lock()
        self.sent: deque = deque()  # (ref, method, args) of `send` calls not yet acknowledged

    def call(self, method: str, *args):
        import ray

        while True:
            handle = self.handle
            try:
                return ray.get(getattr(handle, method).remote(*args))
            except ray.exceptions.RayActorError:
                self._refind(handle)

    def tell(self, method: str, *args) -> None:
        """Fire and forget (a heartbeat): one lost with a lost coordinator does not matter."""
        getattr(self.handle, method).remote(*args)

    def send(self, method: str, *args) -> None:
        """A call whose answer the caller does not wait for (a unit committed): the writer goes on to the next
        unit instead of waiting a round trip per unit. At most SENDS_PENDING are in flight; one that met a lost
        coordinator is made again, through `call`, on its replacement. Calls from one thread of a worker reach
        the coordinator in the order made. One thread sends; `drain` waits for the rest."""
        self.sent.append((getattr(self.handle, method).remote(*args), method, args))
        while len(self.sent) > SENDS_PENDING:
            self._acknowledged(*self.sent.popleft())

    def drain(self) -> None:
        while self.sent:
            self._acknowledged(*self.sent.popleft())

    def _acknowledged(self, ref, method: str, args: tuple) -> None:
        import ray

        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:
            self.call(method, *args)

    def _refind(self, dead) -> None:
        import ray

        with self.lock:
            if self.handle is not dead:
                return  # another thread found the new one
            deadline = time.time() + REFIND_S
            while time.time() < deadline:
                try:
                    found = ray.get_actor(self.name, namespace=self.namespace)
                    if found._actor_id != dead._actor_id:
                        ray.get(found.adopt.remote(self.worker, self.held()))
                        self.handle = found
                        log.warning("%s: the coordinator was replaced; carrying on", self.worker)
                        return
                except (ValueError, ray.exceptions.RayActorError):
                    pass  # not started yet, or lost again
                time.sleep(0.5)
        raise CoordinatorGone(f"{self.worker}: the coordinator was lost and not replaced within {REFIND_S:.0f}s")


class UnitFeed:
    """Background thread: leases units from the coordinator and reads them, `prefetch` ahead. Its own
    failure reaches the engine loop through the queue, so the loop never waits on a dead thread."""

    def __init__(self, link: CoordinatorLink, reader, worker, prefetch: int, lease_units: int = 1):
        self.link, self.reader, self.worker, self.lease_units = link, reader, worker, lease_units
        self.ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.unit_s = 0.0  # how long the engine loop took per unit, over its last PACE_UNITS; 0 until then
        self.taken: deque[float] = deque(maxlen=PACE_UNITS + 1)  # when it took them (the loop's thread only)
        self.thread = threading.Thread(target=self._run, name=f"feed-{worker.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._lease_and_read()
        except Exception as e:  # handed to the loop, which raises it
            self.ready.put(e)

    def _lease_and_read(self) -> None:
        wait, draining = WAIT_S[0], self.worker.draining
        while not draining.is_set():
            lease = self.link.call("next_units", self.worker.identity, self.lease_size())
            if lease.state == "done":
                break
            if lease.state == "wait":
                draining.wait(wait)
                wait = min(2 * wait, WAIT_S[1])
                continue
            wait = WAIT_S[0]
            for k, (unit, attempt) in enumerate(zip(lease.units, lease.attempts, strict=False)):
                self.worker.hold(unit.id, attempt)
                if draining.is_set():
                    self.worker.hand_back([u.id for u in lease.units[k:]])
                    break
                try:
                    work = self.reader.read(unit, attempt)
                except Exception as e:
                    log.warning("%s: %s", self.worker.name, e)
                    self.worker.failed(unit.id, f"read_error: {e}")
                    continue
                self._put(work)
        if draining.is_set():
            self._hand_back_read()
        self.ready.put(END)

    def _put(self, work: UnitWork) -> None:
        """Queue a read unit for the engine loop; one still waiting when the node's notice comes is handed back."""
        while True:
            try:
                self.ready.put(work, timeout=0.2)
                return
            except queue.Full:
                if self.worker.draining.is_set():
                    self.worker.hand_back([work.unit.id])
                    return

    def _hand_back_read(self) -> None:
        """Units read ahead that the engine loop has not taken go back to the queue."""
        ids = []
        while True:
            try:
                item = self.ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, UnitWork):
                ids.append(item.unit.id)
        if ids:
            self.worker.hand_back(ids)

    def lease_size(self) -> int:
        """The pool's units per lease, or for an engine that takes a unit in a few ms, as many as it runs in
        LEASE_AHEAD_S (at most LEASE_MAX times as many): one round trip to the coordinator then serves many
        units. A slower engine's leases stay as the pool sets them, so no worker holds work another could run."""
        if not self.unit_s:
            return self.lease_units
        return max(self.lease_units, min(self.lease_units * LEASE_MAX, int(LEASE_AHEAD_S / self.unit_s)))

    def get(self, block: bool):
        try:
            item = self.ready.get(block=block, timeout=None if block else 0)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise item
        if item is not END:
            self.taken.append(time.monotonic())
            if len(self.taken) == self.taken.maxlen:
                self.unit_s = (self.taken[-1] - self.taken[0]) / PACE_UNITS
        return item


class Worker:
    """One engine, fed by a UnitFeed; finished units are committed on a writer thread.

    `identity` names this incarnation (a replacement gets another), `name` the replica (pool-replica) that
    commit markers record. The engine is built in `run`, so a model that cannot load is a ModelError the
    driver sees as such; from then on a heartbeat says how long the engine has held work without progress.
    """

    def __init__(self, spec: JobSpec, pool_index: int, replica: int, coordinator, run_id: str,
                 identity: str | None = None, namespace: str = ""):
        import ray

        self.pool_index, self.pool = pool_index, spec.pool_names()[pool_index]
        self.name = f"{self.pool}-{replica}"
        self.identity = identity or self.name
        self.spec, self.run_id = spec, run_id
        self.held: dict[str, int] = {}  # unit id -> attempt, leased and not yet settled
        self.held_lock = threading.Lock()
        self.link = CoordinatorLink(coordinator, "coordinator", namespace, self.identity, self.held_units)
        self.node = ray.get_runtime_context().get_node_id()
        self.draining = threading.Event()  # set by a preemption notice (SIGTERM): take no more units
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._notice)
        threading.Thread(target=_exit_with_raylet, args=(os.getppid(), self.name), daemon=True).start()
        self.engine = None
        self.loop: BatchLoop | None = None
        self.store = OutputStore(spec)
        self.commits: queue.Queue = queue.Queue(maxsize=COMMITS_PENDING)
        self.unreported: list = []  # stats of units committed and not yet reported (the writer's own)
        self.waiting_on_store = False
        self.writer_error: BaseException | None = None
        self.tokens = 0

    def __repr__(self) -> str:  # Ray shows it in the dashboard and before each of this actor's log lines
        return f"Worker({self.identity})"

    def _notice(self, signum, frame) -> None:
        """SIGTERM, as a node's preemption notice or Ray's drain gives it: stop taking units, hand back those
        not started, finish and commit those in the engine, then end (`run` returns)."""
        if not self.draining.is_set():
            log.warning("%s: SIGTERM: taking no more units; finishing the %d held", self.identity, len(self.held))
        self.draining.set()

    def hand_back(self, unit_ids: list[str]) -> None:
        """Give units leased and not started back to the queue, with no attempt counted."""
        for uid in unit_ids:
            self._release(uid)
        self.link.call("hand_back", self.identity, unit_ids)

    def load(self) -> None:
        """Build the engine, then warm it up with one short decode (runner.engines.warm_up); the coordinator
        hears of each step, so a crash in either is reported as what it was."""
        pool = self.spec.workers[self.pool_index]
        started = time.time()
        # Beside the model's load, which llama.cpp and vLLM do mostly without holding the GIL.
        primed = threading.Thread(target=prime_parquet, name="prime-parquet", daemon=True)
        primed.start()
        try:
            self.engine = create_engine(pool, self.spec)
        except Exception as e:
            raise load_error(self.pool, pool, e, "cannot load") from None
        finally:
            primed.join()
        self.link.call("loaded", self.identity, time.time() - started)  # waited for: the first decode is next
        try:
            warm_up(self.engine)
        except Exception as e:
            self.engine.close()
            raise load_error(self.pool, pool, e, "cannot decode with") from None
        self.link.call("ready", self.identity)

    def run(self) -> dict:
        """Load the engine, then work until the coordinator has nothing left; returns this worker's totals."""
        # a native crash from here on names its signal in this file, which the driver reads back
        self.crash_log, self.crash_file = watch_crashes(self.identity)
        self.link.call("starting", self.identity, WorkerInfo(self.node, self.crash_log, describe_cpu(cpu_flags())))
        self.load()
        started = time.time()
        writer = threading.Thread(target=self._commit_loop, name="commit", daemon=True)
        writer.start()
        feed = UnitFeed(self.link, open_reader(self.spec), self, self.spec.prefetch_units,
                        self.spec.units_per_lease(self.pool_index))
        self.loop = BatchLoop(self.engine, feed, self._commit_later, self.spec.sampling)
        stop_beat = threading.Event()
        threading.Thread(target=self._beat, args=(stop_beat,), name="beat", daemon=True).start()
        try:
            self.loop.run()
            self._commit_later(None)
            writer.join()
            if self.writer_error is not None:
                raise self.writer_error
            self.link.drain()
        finally:
            stop_beat.set()
            self.engine.close()
            unwatch_crashes(self.crash_log, self.crash_file)
        return {"worker": self.identity, "completion_tokens": self.tokens, "wall_s": time.time() - started,
                "drained": self.draining.is_set()}

    def stalled_s(self) -> float:
        """Seconds the engine has held requests without a step returning; 0 while idle or waiting on the store."""
        loop = self.loop
        if loop is None or not loop.owners or self.waiting_on_store:
            return 0.0
        return max(0.0, time.monotonic() - loop.last_progress)

    def _beat(self, stop: threading.Event) -> None:
        """Tell the coordinator whether the engine progresses: each STALL_BEAT_S while it stalls and once when
        it recovers, else each IDLE_BEAT_S (the coordinator's CPU grows with beats, not with units)."""
        sent_at, sent = float("-inf"), 0.0
        while not stop.wait(STALL_BEAT_S):
            stalled, now = self.stalled_s(), time.monotonic()
            if should_beat(stalled, sent, now - sent_at):
                self.link.tell("beat", self.identity, stalled)
                sent_at, sent = now, stalled

    def hold(self, unit_id: str, attempt: int) -> None:
        with self.held_lock:
            self.held[unit_id] = attempt

    def held_units(self) -> list[tuple[str, int]]:
        with self.held_lock:
            return list(self.held.items())

    def _release(self, unit_id: str) -> None:
        with self.held_lock:
            self.held.pop(unit_id, None)

    def completed(self, stats) -> None:
        """A unit is committed: it is no longer held, and the writer reports it (`_report`)."""
        self._release(stats.unit_id)
        self.unreported.append(stats)

    def _report(self) -> None:
        """Tell the coordinator of the units committed since the last report, in one call, not waited for
        (`send`): an idle writer reports each unit at once, a busy one every few units."""
        if self.unreported:
            stats, self.unreported = self.unreported, []
            self.link.send("complete_all", self.identity, stats)

    def failed(self, unit_id: str, error: str) -> None:
        """Report a unit that could not be read or committed; it is no longer held."""
        self._release(unit_id)
        self.link.call("fail", self.identity, unit_id, error)

    def _commit_later(self, work: UnitWork | None) -> None:
        """Queue a finished unit (None: the end) for the writer; with COMMITS_PENDING already queued, the
        engine loop waits, and says so to the stall check."""
        self.waiting_on_store = True
        try:
            while self.writer_error is None:
                try:
                    self.commits.put(work, timeout=1.0)
                    return
                except queue.Full:
                    continue
            raise self.writer_error
        finally:
            self.waiting_on_store = False

    def _commit_loop(self) -> None:
        try:
            while (work := self.commits.get()) is not None:
                self._commit(work)
                if self.commits.empty() or len(self.unreported) >= REPORT_EVERY:
                    self._report()
            self._report()
        except BaseException as e:  # the engine loop raises it at its next commit
            self.writer_error = e

    def _commit(self, work: UnitWork) -> None:
        unit = work.unit
        try:
            stats = self.store.commit_results(
                unit, work.inputs, work.results, self.engine.embedding_dim, pool=self.pool, worker=self.name,
                node=self.node, run_id=self.run_id, attempt=work.attempt, started_at=work.started_at,
                finished_at=time.time())
        except FencedError as e:  # its driver lost the job lock: no more commits; that driver stops the job
            log.warning("%s: %s; taking no more units", self.name, e)
            self.draining.set()
            return
        except Exception as e:
            log.error("%s: commit of %s failed: %s", self.name, unit.id, e)
            self.failed(unit.id, f"commit_error: {e}")
            return
        self.tokens += stats.completion_tokens
        self.completed(stats)


def _exit_with_raylet(raylet_pid: int, name: str) -> None:
    """A worker process outlives its raylet when the node's Ray is killed (a driver's embedded Ray dying with
    it): it would hold its engine's memory, and might still commit units, forever. Ray starts each worker
    from its raylet, so a changed parent means the raylet is gone; the worker follows it."""
    while os.getppid() == raylet_pid:
        time.sleep(1.0)
    log.error("%s: its raylet (pid %d) is gone; exiting", name, raylet_pid)
    os._exit(1)


def should_beat(stalled: float, last_sent: float, since_sent: float) -> bool:
    """Whether a worker beats now: while its engine stalls, when it has just recovered (the last beat said it
    stalled), or when IDLE_BEAT_S have passed since the last beat."""
    return stalled >= STALL_BEAT_S or last_sent >= STALL_BEAT_S or since_sent >= IDLE_BEAT_S
