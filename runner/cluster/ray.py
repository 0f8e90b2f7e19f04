"""A job on Ray: start or join Ray, start the coordinator and the worker pools, supervise them, replace lost workers."""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass

from runner.cluster.address import check_address
from runner.cluster.placement import check_fits, replica_group, replica_options
from runner.cluster.progress import Progress, Timings
from runner.errors import ClusterError, JobFailedError, ModelError, RunnerError, first_line
from runner.inputs.units import Unit
from runner.schedule.coordinator import Coordinator, Phase
from runner.spec.job import JobSpec
from runner.worker.crashes import crash_report, crash_signal, quiet_ray_terminal
from runner.worker.worker import Worker

log = logging.getLogger(__name__)

# Ray starts worker processes at nice 15, below everything else on the node; an engine is the node's main
# work, so it runs at the default priority, as a bare vLLM or llama.cpp process would (Ray's job supervisor
# does the same for drivers). Merged with the job's own runtime env by Ray. An embedded Ray is started with
# that priority for all its workers instead (NICE_WORKERS), so actors take the worker processes Ray starts
# ahead, where a runtime env of their own would have each wait for a new process.
WORKER_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}
NICE_WORKERS = {"worker_niceness": 0}


def run_on_ray(spec: JobSpec, units: list[Unit], run_id: str, options, failed_allowed: float | None = None,
               lock=None, timings: Timings | None = None, cluster: RayCluster | None = None
               ) -> tuple[list[tuple[Unit, str]], list]:
    """Process `units` on Ray until each is committed or given up; returns the given-up ones and the stats
    of those committed. Stops early, leaving units unrun, once more than `failed_allowed` rows have failed,
    or when `lock` (the driver's JobLock) is found taken by another driver. `cluster`: the run's Ray, started
    here if it is not yet, which the caller stops; without it, a Ray of its own, stopped before returning.
    `timings` gets the run's phases."""
    timings = timings or Timings()
    own = cluster is None
    cluster = cluster or RayCluster(spec, run_id, options)
    try:
        if cluster.start():
            timings.mark("ray start")
        check_fits(spec, embedded=not options.address)
        worker_env = None if cluster.nice_workers else WORKER_ENV
        return Supervisor(spec, units, run_id, failed_allowed, lock, worker_env, timings).run(options.progress)
    finally:
        if own and cluster.stop():
            timings.mark("ray stop")


class RayCluster:
    """A run's Ray: an embedded one (no address), or the cluster at `options.address`, joined. A process
    already connected to Ray (a test's, a job submitted to a cluster) keeps its connection: `start` and
    `stop` then do nothing."""

    def __init__(self, spec: JobSpec, run_id: str, options):
        self.spec, self.run_id, self.options = spec, run_id, options
        self.started_here = False

    @property
    def nice_workers(self) -> bool:
        """Whether every worker process already runs at the default priority (NICE_WORKERS)."""
        return self.started_here and not self.options.address

    def start(self) -> bool:
        """Start or join Ray unless connected; True when this call did."""
        import ray

        if self.started_here or ray.is_initialized():
            return False
        quiet_ray_terminal()
        start_ray(self.spec, self.run_id, self.options)
        self.started_here = True
        return True

    def stop(self) -> bool:
        """Disconnect (stopping an embedded Ray) if `start` connected; True when this call did."""
        if not self.started_here:
            return False
        import ray

        stop_ray(ray)
        self.started_here = False
        return True


def import_ray_meanwhile() -> None:
    """Import Ray (a few tenths of a second) on a helper thread while the driver claims the job's output
    location, which mostly waits on the lock and storage; `import ray` then finds it done."""
    threading.Thread(target=importlib.import_module, args=("ray",), name="import-ray", daemon=True).start()


def start_ray(spec: JobSpec, run_id: str, options) -> None:
    """Start an embedded Ray (no address), or join the cluster at `options.address`: ClusterError (one line)
    when no cluster answers there, where Ray itself would retry for minutes."""
    embedded = not options.address
    if not embedded:
        check_address(options.address)
    import ray
    from ray.job_config import JobConfig

    # "local" always starts an embedded Ray, even where a `ray start` cluster runs on this machine.
    # The job's name is its metadata, which the dashboard's Jobs page shows.
    try:
        ctx = ray.init(address=options.address or "local", include_dashboard=options.dashboard if embedded else None,
                       job_config=JobConfig(metadata={"job_name": spec.name, "run_id": run_id}),
                       logging_level=logging.WARNING, log_to_driver=True,
                       **({"_system_config": NICE_WORKERS} if embedded else {}))
    except (ConnectionError, RuntimeError, ValueError) as e:  # a bad address, a cluster of another Ray version
        if embedded:
            raise
        raise ClusterError(f"--address {options.address}: cannot join the Ray cluster ({first_line(e, 300)})") from None
    announce(ctx)


def stop_ray(ray) -> None:
    """Disconnect, stopping an embedded Ray. ray.shutdown() gives each process it started a second to exit
    on SIGTERM, and Ray's autoscaler monitor, of no use to a local Ray, always takes all of it: it is killed
    first. That is Ray's private API; in a Ray without it, shutdown takes the second."""
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        if node is not None and node.head:
            node._kill_process_type(ray_constants.PROCESS_TYPE_MONITOR, check_alive=False)
    except Exception as e:  # only a faster shutdown is lost
        log.debug("could not stop Ray's monitor first: %s", e)
    ray.shutdown()


def announce(ctx) -> None:
    """Where to watch the job: the dashboard (which asks for the cluster's token when it has one) and the
    Prometheus endpoint of this node's metrics agent."""
    if ctx.dashboard_url:
        token = os.environ.get("RAY_AUTH_MODE", "token") == "token"
        log.info("Ray dashboard: http://%s%s", ctx.dashboard_url,
                 " (its token: `ray get-auth-token`)" if token else "")
    port = ctx.address_info.get("metrics_export_port")
    if port:
        log.info("Ray metrics (Prometheus): http://%s:%s/metrics", ctx.address_info["node_ip_address"], port)


class Supervisor:
    """Keeps every pool's replicas running until the coordinator reports the queue finished.

    It replaces a lost worker (and kills one whose engine stalls), replaces a lost coordinator from the
    committed markers, stops a pool whose model cannot load or whose engine keeps stalling, and stops the
    job when another driver has taken its output location's lock.
    """

    def __init__(self, spec: JobSpec, units: list[Unit], run_id: str, failed_allowed: float | None = None,
                 lock=None, worker_env: dict | None = WORKER_ENV, timings: Timings | None = None):
        import ray

        from runner.output.store import OutputStore

        self.ray, self.spec, self.run_id, self.failed_allowed, self.lock = ray, spec, run_id, failed_allowed, lock
        self.worker_env, self.timings = worker_env, timings or Timings()
        self.units, self.store = units, OutputStore(spec)
        self.stopping = False
        # Named actors live in a namespace of their own run, so sequential or concurrent jobs never clash.
        self.namespace = f"runner-{spec.name}-{run_id}"
        self.coordinator = self._start_coordinator(units)
        self.coordinators_lost = 0
        self.last_progress: dict = {}
        self.live: dict = {}  # run() ref -> (pool index, replica, actor, identity)
        self.killed: dict[str, str] = {}  # identity -> why the supervisor killed it
        self.groups: dict = {}  # (pool index, replica) -> placement group of a multi-GPU replica
        self.incarnations: dict[tuple[int, int], int] = {}
        self.replacements = sum(p.replicas for p in spec.workers) * spec.max_attempts
        self.retired: dict[int, str] = {}  # pool index -> why it gets no more replicas
        self.unloadable: dict[int, int] = {}  # pool index -> replicas whose model failed to load (or crashed there)
        self.stall_streak: dict[int, int] = {}  # pool index -> stalls since the pool last committed a unit
        self.done_seen: dict[str, int] = {}
        self.rows_total = sum(u.num_rows for u in units)

    def _start_coordinator(self, units: list[Unit], attempts: dict | None = None, gave_up: dict | None = None,
                           totals: dict | None = None):
        deadline = time.time() + 30
        while True:
            try:
                return self.ray.remote(Coordinator).options(
                    num_cpus=0, name="coordinator", namespace=self.namespace, max_restarts=0,
                ).remote(units, self.spec.max_attempts, self.spec.name, attempts, gave_up, totals)
            except ValueError:  # the lost one's name is not released yet
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def _replace_coordinator(self, error: str) -> None:
        """A new coordinator from the plan less the committed markers; attempts and give-ups as last seen."""
        self.coordinators_lost += 1
        if self.coordinators_lost > 10:
            raise JobFailedError(f"job {self.spec.name}: the coordinator was lost {self.coordinators_lost} times; "
                                 f"last: {error}")
        committed = self.store.committed_ids()
        todo = [u for u in self.units if u.id not in committed]
        seen = self.last_progress
        log.warning("the coordinator was lost (%s); a new one takes the %d units not committed", error, len(todo))
        self.ray.kill(self.coordinator, no_restart=True)
        self.coordinator = self._start_coordinator(todo, seen.get("attempts"), seen.get("gave_up"), seen)
        self.done_seen.clear()

    def _ask(self, method: str, *args):
        """Call the coordinator; a lost one is replaced and the call made again."""
        while True:
            try:
                return self.ray.get(getattr(self.coordinator, method).remote(*args))
            except self.ray.exceptions.RayActorError as e:
                self._replace_coordinator(short_error(e))

    def spawn(self, pool_index: int, replica: int) -> None:
        name = self.spec.pool_names()[pool_index]
        n = self.incarnations[(pool_index, replica)] = self.incarnations.get((pool_index, replica), -1) + 1
        identity = f"{name}-{replica}" + (f".{n}" if n else "")
        actor = self.ray.remote(Worker).options(
            name=identity, namespace=self.namespace, max_restarts=0, runtime_env=self.worker_env,
            **self.placement(pool_index, replica),
        ).remote(self.spec, pool_index, replica, self.coordinator, self.run_id, identity, self.namespace)
        self.live[actor.run.remote()] = (pool_index, replica, actor, identity)

    def placement(self, pool_index: int, replica: int) -> dict:
        """Ray options that place one replica; a multi-GPU replica's placement group is kept for its
        replacements too."""
        pool = self.spec.workers[pool_index]
        key = (pool_index, replica)
        if pool.gpus_per_replica > 1 and key not in self.groups:
            self.groups[key] = replica_group(pool, f"{self.namespace}-{self.spec.pool_names()[pool_index]}-{replica}")
        return replica_options(pool, self.groups.get(key))

    def run(self, show_progress: bool) -> tuple[list[tuple[Unit, str]], list]:
        """Returns the given-up units (with their last error) and the stats of the units committed."""
        for i, pool in enumerate(self.spec.workers):
            for r in range(pool.replicas):
                self.spawn(i, r)
        try:
            with Progress(self.rows_total, show_progress) as bar:
                while self.live:
                    if self.lock is not None:
                        self.lock.check()  # another driver took the output location: stop here
                    ready, _ = self.ray.wait(list(self.live), num_returns=1, timeout=1.0)
                    for ref in ready:
                        self._reap(ref)
                    progress = self.last_progress = self._ask("progress")
                    bar.update(progress)
                    if progress["finished"] or self._too_many_failed(progress):
                        break  # every unit is settled; a replica still waiting for a node is not needed
                    self._watch(progress)
            progress = self.last_progress = self._ask("progress")
            given_up, committed = self._ask("given_up"), self._ask("committed")
            self._mark_phases(self._ask("timings"))
        finally:
            self.close()
        if not progress["finished"] and not self._too_many_failed(progress):
            raise self._why_stopped(progress)
        return given_up, committed

    def _mark_phases(self, times: dict) -> None:
        """The coordinator's view of the run, as phases: workers starting and loading their engines until the
        first lease, the first unit, the rest of the units, then the supervisor noticing the end."""
        loads = times.get("load_s") or {}
        load = f" (engine load {max(loads.values()):.2f}s)" if loads else ""
        for phase, key in ((f"workers up{load}", "first_lease"), ("first unit", "first_commit"),
                           ("units", "last_commit")):
            if key in times:
                self.timings.mark(phase, times[key])
        self.timings.mark("end seen")

    def _why_stopped(self, progress: dict) -> Exception:
        left = progress["units_queued"] + progress["units_in_flight"]
        names = self.spec.pool_names()
        if self.retired and set(self.retired) <= set(self.unloadable):  # no pool could load its model
            return ModelError(next(iter(self.retired.values())))
        if self.retired:
            whys = "; ".join(why for _, why in sorted(self.retired.items()))
            return JobFailedError(f"job {self.spec.name}: {whys}; {left} unit{'s' if left != 1 else ''} not run")
        lost = [n for i, n in enumerate(names) if i not in self.retired]
        return JobFailedError(f"job {self.spec.name}: every worker was lost ({', '.join(lost)}); "
                              f"last error: {progress['last_error']}")

    def _crash(self, pool_index: int, identity: str):
        """The native crash that ended a worker (runner.crashes.CrashReport), None when it did not crash."""
        info = self._ask("worker_info", identity)
        signal = crash_signal(info.log, info.node)
        if signal is None:
            return None
        return crash_report(self.spec.pool_names()[pool_index], self.spec.workers[pool_index], identity, signal, info)

    def _unloadable(self, pool_index: int, why: str) -> None:
        """A replica whose model cannot load or crashes its first decode; when every replica is, the pool
        is retired."""
        self.unloadable[pool_index] = self.unloadable.get(pool_index, 0) + 1
        if self.unloadable[pool_index] < self.spec.workers[pool_index].replicas:
            # said when the pool's other replicas work; when none will, the pool's retirement says it once
            working = self.done_seen.get(self.spec.pool_names()[pool_index], 0)
            log.log(logging.WARNING if working else logging.DEBUG, "%s", why)
            return
        self.retired[pool_index] = why
        if self.live:  # else it is the job's own error
            log.error("%s; the job goes on without this pool", why)

    def _watch(self, progress: dict) -> None:
        """Kill each worker whose engine has held rows without progress for its pool's stall_timeout_s."""
        for pool, done in progress["done_by_pool"].items():
            if done > self.done_seen.get(pool, 0):
                self.stall_streak.pop(self.spec.pool_names().index(pool), None)
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
        from ray.util.placement_group import remove_placement_group

        for group in self.groups.values():
            remove_placement_group(group)
        self.groups.clear()

    def _reap(self, ref) -> None:
        pool_index, replica, actor, identity = self.live.pop(ref)
        pool_name = self.spec.pool_names()[pool_index]
        try:
            self.ray.get(ref)
            return
        except self.ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            killed = self.killed.pop(identity, None)
            how = f"lost: {killed or short_error(e)}"
        self.ray.kill(actor, no_restart=True)
        crash = None if killed or isinstance(cause, RunnerError) else self._crash(pool_index, identity)
        if crash is not None:
            how = f"crashed ({crash.signal})"
            if crash.phase is not Phase.RUNNING:  # at load: it would crash the same way again
                cause = ModelError(crash.line)
        lost = self._ask("worker_lost", identity, how)
        if isinstance(cause, ModelError):  # it would fail the same way again: this replica is done
            self._unloadable(pool_index, str(cause))
            return
        if crash is not None:
            log.error("%s; %d units back in the queue", crash.line, len(lost))
        else:
            log.warning("worker %s %s; %d units back in the queue", identity, how, len(lost))
        limit = self.spec.max_attempts + 1  # a poison unit alone stalls max_attempts times, then is given up
        if self.stall_streak.get(pool_index, 0) >= limit and pool_index not in self.retired:
            timeout = self.spec.workers[pool_index].stall_timeout_s
            self.retired[pool_index] = (f"pool {pool_name} stalled: its engine made no progress for "
                                        f"{timeout:g}s (stall_timeout_s), {limit} times in a row")
            log.error("%s; it gets no more replicas", self.retired[pool_index])
        if pool_index in self.retired:
            return
        if not self.last_progress.get("finished") and self.replacements > 0:
            self.replacements -= 1
            self.spawn(pool_index, replica)


def short_error(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = (lines[-1] if lines else "").split(" Some common causes include")[0]  # Ray's advice is not the error
    return f"{type(e).__name__}: {text}"[:500]


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None  # None: an embedded local Ray
    overwrite: bool = False
    dashboard: bool = True
    progress: bool = True
