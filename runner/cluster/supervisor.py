"""The supervisor: the driver's loop that keeps each pool's replicas running until the queue is finished.

It starts each pool's replicas (a fixed count, or `auto`: as many as fit on the live nodes, more as nodes
join), tries a failed start again with backoff, replaces a lost worker, a stalled one and a lost coordinator,
hands a lost node's units to the other replicas at the first sign of the loss, stops Ray-drained nodes'
workers taking units, and records each of these as an event for the report's timeline.
"""

from __future__ import annotations

import logging
import time

from runner.cluster.nodes import NodeWatch
from runner.cluster.placement import head_node, on_node, replica_group, replica_options, replicas_that_fit
from runner.cluster.progress import Progress, Timings
from runner.cluster.replicas import Replicas, backoff
from runner.errors import JobFailedError, ModelError, RunnerError, short_error
from runner.inputs.units import Unit
from runner.output.files import OutputWriter
from runner.output.ledger import Ledger
from runner.output.store import OutputStore
from runner.schedule.coordinator import Coordinator, Phase
from runner.spec.job import JobSpec
from runner.worker.crashes import crash_report, crash_signal
from runner.worker.worker import Worker

log = logging.getLogger(__name__)

TICK_S = 1.0  # the supervisor's loop: progress, stalls, nodes, scaling, folding the ledger
FOLD_EVERY_S = 5.0  # how often the driver takes the coordinator's new commits into its ledger


class Supervisor:
    """Keeps every pool's replicas running until the coordinator reports the queue finished.

    It also stops a pool whose model cannot load (each replica given up after start_attempts) or whose engine
    keeps stalling, and stops the job when another driver has taken its output location's lock.
    """

    def __init__(self, spec: JobSpec, units: list[Unit], run_id: str, failed_allowed: float | None = None,
                 lock=None, worker_env: dict | None = None, timings: Timings | None = None,
                 nodes: NodeWatch | None = None, ledger: Ledger | None = None):
        import ray

        self.ray, self.spec, self.run_id, self.failed_allowed, self.lock = ray, spec, run_id, failed_allowed, lock
        self.worker_env, self.timings = worker_env, timings or Timings()
        self.units = units
        # what is committed: this run's commits are added as they come, and folded in while `lock` is held
        self.ledger = ledger or Ledger.load(OutputStore(spec).loc)
        self.output = OutputWriter(self.ledger, spec.output.target_file_mb, run_id, lock)
        self.reported, self.next_fold = 0, time.time() + FOLD_EVERY_S  # commits taken from this coordinator
        self.names = spec.pool_names()
        self.stopping = False
        self.nodes = nodes or NodeWatch()
        self.events: list[dict] = []  # what happened to the cluster, for the report's timeline
        self.placeable = self.nodes.poll().nodes
        # Named actors live in a namespace of their own run, so sequential or concurrent jobs never clash.
        self.namespace = f"runner-{spec.name}-{run_id}"
        self.coordinator = self._start_coordinator(units)
        self.coordinators_lost = 0
        self.last_progress: dict = {}
        self.live: dict = {}  # run() ref -> (pool index, replica, actor, identity)
        self.killed: dict[str, str] = {}  # identity -> why the supervisor killed it
        self.groups: dict = {}  # (pool index, replica) -> placement group of a multi-GPU replica
        self.incarnations: dict[tuple[int, int], int] = {}
        self.pools = [Replicas() for _ in spec.workers]
        self.losses = 0  # workers lost by their own doing (not their node's), against max_attempts x replicas
        self.peak = 1
        self.retired: dict[int, str] = {}  # pool index -> why it gets no more replicas
        self.stall_streak: dict[int, int] = {}  # pool index -> stalls since the pool last committed a unit
        self.done_seen: dict[str, int] = {}
        self.rows_total = sum(u.num_rows for u in units)

    def event(self, kind: str, what: str) -> None:
        self.events.append({"at": round(time.time(), 3), "kind": kind, "what": what, "run_id": self.run_id})

    # The coordinator

    def _start_coordinator(self, units: list[Unit], attempts: dict | None = None, gave_up: dict | None = None,
                           totals: dict | None = None, awaiting: tuple[str, ...] = ()):
        deadline = time.time() + 30
        while True:
            try:
                return self.ray.remote(Coordinator).options(
                    num_cpus=0, name="coordinator", namespace=self.namespace, max_restarts=0,
                    **on_node(head_node(self.placeable)),  # on the node a cluster is least likely to lose
                ).remote(units, self.spec.max_attempts, self.spec.name, attempts, gave_up, totals, awaiting)
            except ValueError:  # the lost one's name is not released yet
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def _replace_coordinator(self, error: str) -> None:
        """A new coordinator from the plan less what is committed; attempts and give-ups as last seen. It leases
        nothing until the live workers have adopted what they hold (runner.schedule.coordinator.ADOPT_WAIT_S)."""
        self.coordinators_lost += 1
        if self.coordinators_lost > 10:
            raise JobFailedError(f"job {self.spec.name}: the coordinator was lost {self.coordinators_lost} times; "
                                 f"last: {error}")
        self.output.wait()
        self.ledger.refresh()  # what the lost one took with it too
        self.reported = 0
        todo = [u for u in self.units if u.id not in self.ledger.units]
        seen = self.last_progress
        log.warning("the coordinator was lost (%s); a new one takes the %d units not committed", error, len(todo))
        self.event("coordinator replaced", error)
        self.ray.kill(self.coordinator, no_restart=True)
        self.coordinator = self._start_coordinator(todo, seen.get("attempts"), seen.get("gave_up"), seen,
                                                   tuple(identity for *_, identity in self.live.values()))
        self.done_seen.clear()

    def _ask(self, method: str, *args):
        """Call the coordinator; a lost one is replaced and the call made again."""
        while True:
            try:
                return self.ray.get(getattr(self.coordinator, method).remote(*args))
            except self.ray.exceptions.RayActorError as e:
                self._replace_coordinator(short_error(e))

    # Replicas

    def spawn(self, pool_index: int, replica: int) -> None:
        name = self.names[pool_index]
        n = self.incarnations[(pool_index, replica)] = self.incarnations.get((pool_index, replica), -1) + 1
        identity = f"{name}-{replica}" + (f".{n}" if n else "")
        actor = self.ray.remote(Worker).options(
            name=identity, namespace=self.namespace, max_restarts=0, runtime_env=self.worker_env,
            **self.placement(pool_index, replica),
        ).remote(self.spec, pool_index, replica, self.coordinator, self.run_id, identity, self.namespace)
        self.live[actor.run.remote()] = (pool_index, replica, actor, identity)
        self.pools[pool_index].live.add(replica)
        self.pools[pool_index].waiting.pop(replica, None)

    def placement(self, pool_index: int, replica: int) -> dict:
        """Ray options that place one replica; a multi-GPU replica's placement group is kept for its
        replacements too."""
        pool = self.spec.workers[pool_index]
        key = (pool_index, replica)
        if pool.gpus_per_replica > 1 and key not in self.groups:
            self.groups[key] = replica_group(pool, f"{self.namespace}-{self.names[pool_index]}-{replica}")
        return replica_options(pool, self.groups.get(key))

    def _scale(self) -> None:
        """Start what each pool is short of its target (an auto pool's follows the nodes), and the replicas
        whose backoff is over."""
        now = time.time()
        for i, (pool, reps) in enumerate(zip(self.spec.workers, self.pools, strict=True)):
            if i in self.retired:
                continue
            if pool.replicas == "auto":
                fit = replicas_that_fit(pool, self.placeable)
                # none fits yet: one waits for a node, which is what an autoscaler adds nodes for
                reps.target = max(1, min(fit, pool.max_replicas or fit))
            else:
                reps.target = pool.replicas
            for replica, due in sorted(reps.waiting.items()):
                if due <= now:
                    self.spawn(i, replica)
            while reps.active() + len(reps.given_up) < reps.target:  # a replica given up keeps its place
                self.spawn(i, reps.next_index())
        self.peak = max(self.peak, sum(r.target for r in self.pools))

    def _replace(self, pool_index: int, replica: int, counted: bool) -> None:
        """Start the replica again unless its pool is retired, the queue is finished, or (an auto pool) it is
        above its target now; `counted`: its loss was its own, against the job's budget of losses."""
        reps = self.pools[pool_index]
        if pool_index in self.retired or self.last_progress.get("finished"):
            return
        if counted:
            self.losses += 1
            if self.losses > self.peak * self.spec.max_attempts:
                return
        if reps.active() + len(reps.given_up) < reps.target:
            self.spawn(pool_index, replica)

    def _start_failed(self, pool_index: int, replica: int, why: str) -> None:
        """A replica whose engine did not load or crashed at load: started again after a backoff, up to the
        pool's start_attempts; a pool with no replica left to start is retired."""
        reps, pool = self.pools[pool_index], self.spec.workers[pool_index]
        n = reps.failed_starts[replica] = reps.failed_starts.get(replica, 0) + 1
        working = self.done_seen.get(self.names[pool_index], 0)
        level = logging.WARNING if working else logging.DEBUG  # a pool that never works says it once
        if n < pool.start_attempts and pool_index not in self.retired and not self.last_progress.get("finished"):
            wait = backoff(n)
            reps.waiting[replica] = time.time() + wait
            log.log(level, "%s; starting replica %s-%d again in %gs (start %d of %d)", why, self.names[pool_index],
                    replica, wait, n + 1, pool.start_attempts)
            self.event("replica start failed", f"{self.names[pool_index]}-{replica}: {why}")
            return
        reps.given_up.add(replica)
        if reps.active():
            log.log(level, "%s; replica %s-%d is given up after %d starts", why, self.names[pool_index], replica, n)
            return
        self.retired[pool_index] = why
        reps.waiting.clear()
        if self.live:  # else it is the job's own error
            log.error("%s; the job goes on without this pool", why)

    # Nodes

    def _watch_nodes(self) -> None:
        changes = self.nodes.poll()
        self.placeable = changes.nodes
        for node in changes.joined:
            log.info("node %s joined the cluster", node[:8])
            self.event("node joined", node)
        if changes.draining:
            log.warning("Ray drains node%s %s: its workers take no more units", "s" if len(changes.draining) > 1
                        else "", ", ".join(n[:8] for n in changes.draining))
            self._ask("drain", changes.draining)
            for node in changes.draining:
                self.event("node draining", node)
        if changes.lost:
            self._lose_nodes(changes.lost)

    def _lose_nodes(self, nodes: list[str]) -> None:
        """Workers on lost nodes are lost now, and their units queued for the other replicas, instead of when
        Ray's health check declares the node dead."""
        gone = set(self._ask("workers_on", nodes))
        for node in nodes:
            self.event("node lost", node)
        lost = 0
        for ref, (pool_index, replica, actor, identity) in list(self.live.items()):
            if identity not in gone:
                continue
            del self.live[ref]
            self.pools[pool_index].live.discard(replica)
            held = self._ask("worker_lost", identity, "lost: its node is gone", True)
            lost += len(held)
            self.event("worker lost", f"{identity}: its node is gone; its units {', '.join(held) or 'none'} queued "
                                      "first")
            self.ray.kill(actor, no_restart=True)
            self._replace(pool_index, replica, counted=False)
        log.warning("node%s %s lost: %d worker%s and their %d units back in the queue", "s" if len(nodes) > 1 else "",
                    ", ".join(n[:8] for n in nodes), len(gone), "s" if len(gone) != 1 else "", lost)

    # The loop

    def run(self, show_progress: bool) -> tuple[list[tuple[Unit, str]], list]:
        """Returns the given-up units (with their last error) and the stats of the units committed."""
        self._scale()
        try:
            with Progress(self.rows_total, show_progress) as bar:
                while self.live or any(r.waiting for r in self.pools):
                    if self.lock is not None:
                        self.lock.check()  # another driver took the output location: stop here
                    if self.live:
                        ready, _ = self.ray.wait(list(self.live), num_returns=1, timeout=TICK_S)
                        for ref in ready:
                            if ref in self.live:  # not already lost with its node
                                self._reap(ref)
                    else:
                        time.sleep(TICK_S / 4)
                    progress = self.last_progress = self._ask("progress")
                    bar.update(progress)
                    if progress["finished"] or self._too_many_failed(progress):
                        break  # every unit is settled; a replica still waiting for a node is not needed
                    self._watch(progress)
                    self._watch_nodes()
                    self._scale()
                    self._fold()
            progress = self.last_progress = self._ask("progress")
            given_up, committed = self._ask("given_up"), self._ask("committed")
            self.timings.mark_phases(self._ask("timings"))
            self.output.wait()
        finally:
            self.close()
        if not progress["finished"] and not self._too_many_failed(progress):
            raise self._why_stopped(progress)
        return given_up, committed

    def _fold(self) -> None:
        """Hand the coordinator's new commits to the output writer, which folds them into the ledger once
        FOLD_AT wait (so `runner status` and a resume list only the latest markers) and writes the output
        files they fill, on its own thread."""
        if time.time() >= self.next_fold and not self.output.busy():
            new = self._ask("committed_since", self.reported)
            self.reported += len(new)
            self.output.take(new)
            self.next_fold = time.time() + FOLD_EVERY_S

    def _why_stopped(self, progress: dict) -> Exception:
        left = progress["units_queued"] + progress["units_in_flight"]
        if self.retired and all(self.pools[i].given_up for i in self.retired):  # no pool could load its model
            return ModelError(next(iter(self.retired.values())))
        if self.retired:
            whys = "; ".join(why for _, why in sorted(self.retired.items()))
            return JobFailedError(f"job {self.spec.name}: {whys}; {left} unit{'s' if left != 1 else ''} not run")
        lost = [n for i, n in enumerate(self.names) if i not in self.retired]
        return JobFailedError(f"job {self.spec.name}: every worker was lost ({', '.join(lost)}); "
                              f"last error: {progress['last_error']}")

    def _watch(self, progress: dict) -> None:
        """Kill each worker whose engine has held rows without progress for its pool's stall_timeout_s."""
        for pool, done in progress["done_by_pool"].items():
            if done > self.done_seen.get(pool, 0):
                self.stall_streak.pop(self.names.index(pool), None)
            self.done_seen[pool] = done
        for pool_index, _, actor, identity in list(self.live.values()):
            stalled = progress["stalled_s"].get(identity, 0.0)
            limit = self.spec.workers[pool_index].stall_timeout_s
            if stalled > limit and identity not in self.killed:
                self.killed[identity] = f"stalled: its engine made no progress for {stalled:.0f}s"
                log.error("worker %s stalled: no step finished for %.0fs (stall_timeout_s %g); replacing it",
                          identity, stalled, limit)
                self.stall_streak[pool_index] = self.stall_streak.get(pool_index, 0) + 1
                self.ray.kill(actor, no_restart=True)

    def _too_many_failed(self, progress: dict) -> bool:
        failed = progress.get("rows_failed", 0) + progress.get("rows_given_up", 0)
        if self.failed_allowed is None or failed <= self.failed_allowed:
            return False
        if not self.stopping:
            self.stopping = True
            log.error("%d rows failed, more than max_failed_rows allows; stopping the job", failed)
        return True

    def close(self) -> None:
        """Actors are ended explicitly: a job leaves nothing running on a long-lived cluster."""
        for _, _, actor, _ in self.live.values():
            self.ray.kill(actor, no_restart=True)
        self.live.clear()
        self.ray.kill(self.coordinator, no_restart=True)
        self.nodes.close()
        from ray.util.placement_group import remove_placement_group

        for group in self.groups.values():
            remove_placement_group(group)
        self.groups.clear()
        self.timings.events.extend(self.events)
        try:
            self.output.close()  # on the way out of an error: that error is the job's, this one is said
        except (RunnerError, OSError) as e:
            log.warning("the ledger's last writes: %s", e)

    def _reap(self, ref) -> None:
        pool_index, replica, actor, identity = self.live.pop(ref)
        self.pools[pool_index].live.discard(replica)
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            killed = self.killed.pop(identity, None)
            how = f"lost: {killed or short_error(e)}"
        else:
            if result.get("drained"):  # its node's notice: it handed back what it had not finished
                self.event("worker drained", identity)
                self._replace(pool_index, replica, counted=False)
            return
        self.ray.kill(actor, no_restart=True)
        info = self._ask("worker_info", identity)
        node_lost = not killed and not self.nodes.answers(info.node)  # its node gone too? (the first sign)
        # a death of its own: not killed here, not its node's (whose crash log went with it, and which Ray
        # would wait to declare dead), not a runner error it raised
        own = not (killed or node_lost or isinstance(cause, RunnerError))
        crash = self._crash(pool_index, identity, info) if own else None
        if crash is not None:
            how = f"crashed ({crash.signal})"
        if node_lost:
            how = "lost: its node is gone"
        lost = self._ask("worker_lost", identity, how, node_lost)
        self.event("worker lost", f"{identity} {how}" + (f"; its units {', '.join(lost) or 'none'} queued first"
                                                         if node_lost else ""))
        if node_lost and info.node in self.nodes.pending_lost:
            self._watch_nodes()  # the node's other workers are lost now, not at the next poll
        if isinstance(cause, ModelError) or (crash is not None and crash.phase is not Phase.RUNNING):
            self._start_failed(pool_index, replica, str(cause) if crash is None else crash.line)
            return
        if own and info.phase is not Phase.RUNNING:
            self._start_failed(pool_index, replica, f"pool {self.names[pool_index]}: worker {identity} {how} "
                                                    f"{info.phase.value}")  # e.g. killed for memory while loading
            return
        if crash is not None:
            log.error("%s; %d units back in the queue", crash.line, len(lost))
        else:
            log.warning("worker %s %s; %d units back in the queue", identity, how, len(lost))
        limit = self.spec.max_attempts + 1  # a poison unit alone stalls max_attempts times, then is given up
        if self.stall_streak.get(pool_index, 0) >= limit and pool_index not in self.retired:
            timeout = self.spec.workers[pool_index].stall_timeout_s
            self.retired[pool_index] = (f"pool {self.names[pool_index]} stalled: its engine made no progress for "
                                        f"{timeout:g}s (stall_timeout_s), {limit} times in a row")
            log.error("%s; it gets no more replicas", self.retired[pool_index])
        self._replace(pool_index, replica, counted=not node_lost)

    def _crash(self, pool_index: int, identity: str, info):
        """The native crash that ended a worker (runner.crashes.CrashReport), None when it did not crash."""
        signal = crash_signal(info.log, info.node)
        if signal is None:
            return None
        return crash_report(self.names[pool_index], self.spec.workers[pool_index], identity, signal, info)

