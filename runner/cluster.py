"""Ray placement: start the coordinator and the worker pools, supervise them, replace lost workers."""

from __future__ import annotations

import logging
import os
import sys
import time

from runner.coordinator import Coordinator
from runner.errors import JobFailedError
from runner.plan import Unit
from runner.pools import PoolBase
from runner.spec import JobSpec
from runner.worker import Worker

log = logging.getLogger(__name__)

# Ray starts worker processes at nice 15, below everything else on the node; an engine is the node's main
# work, so it runs at the default priority, as a bare vLLM or llama.cpp process would (Ray's job supervisor
# does the same for drivers). Merged with the job's own runtime env by Ray.
WORKER_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


def run_on_ray(spec: JobSpec, units: list[Unit], run_id: str, options,
               failed_allowed: float | None = None) -> list[tuple[Unit, str]]:
    """Process `units` on Ray until each is committed or given up; returns the given-up ones. Stops early,
    leaving units unrun, once more than `failed_allowed` rows have failed."""
    import ray

    from ray.job_config import JobConfig

    started_here = not ray.is_initialized()
    if started_here:
        # "local" always starts an embedded Ray, even where a `ray start` cluster runs on this machine.
        # The job's name is its metadata, which the dashboard's Jobs page shows.
        ctx = ray.init(address=options.address or "local",
                       include_dashboard=options.dashboard if not options.address else None,
                       job_config=JobConfig(metadata={"job_name": spec.name, "run_id": run_id}),
                       logging_level=logging.WARNING, log_to_driver=True)
        announce(ctx)
    try:
        check_fits(spec, embedded=not options.address)
        return Supervisor(spec, units, run_id, failed_allowed).run(options.progress)
    finally:
        if started_here:
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


def accelerator(pool: PoolBase) -> dict[str, float]:
    """The pool's accelerator type as the Ray resource every node of that type advertises."""
    return {f"accelerator_type:{pool.accelerator_type}": 0.001} if pool.accelerator_type else {}


def replica_needs(pool: PoolBase) -> dict[str, float]:
    """The Ray resources one replica of the pool takes."""
    need = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources, **accelerator(pool)}
    return {k: v for k, v in need.items() if v}


def check_fits(spec: JobSpec, embedded: bool) -> None:
    """Say when a pool can never be placed instead of waiting forever. On a cluster joined by address
    the autoscaler may still add the nodes a pool needs, so there it is a warning."""
    import ray

    total = ray.cluster_resources()
    for name, pool in zip(spec.pool_names(), spec.workers):
        short = {k: v for k, v in replica_needs(pool).items() if total.get(k, 0) < v}
        if short:
            have = {k: total.get(k, 0) for k in short}
            if embedded:
                raise JobFailedError(f"pool {name}: one replica needs {short} but the Ray cluster has {have}")
            log.warning("pool %s: one replica needs %s and the cluster now has %s; waiting for the autoscaler "
                        "to add such a node", name, short, have)
            continue
        wanted = pool.num_cpus * pool.replicas
        if wanted > total.get("CPU", 0):
            log.warning("pool %s asks for %g CPUs over %d replicas; the cluster has %g, so some replicas wait",
                        name, wanted, pool.replicas, total.get("CPU", 0))


class Supervisor:
    """Keeps every pool's replicas running until the coordinator reports the queue finished."""

    def __init__(self, spec: JobSpec, units: list[Unit], run_id: str, failed_allowed: float | None = None):
        import ray

        self.ray, self.spec, self.run_id, self.failed_allowed = ray, spec, run_id, failed_allowed
        self.stopping = False
        # Named actors live in a namespace of their own run, so sequential or concurrent jobs never clash.
        self.namespace = f"runner-{spec.name}-{run_id}"
        self.coordinator = ray.remote(Coordinator).options(
            num_cpus=0, name="coordinator", namespace=self.namespace).remote(units, spec.max_attempts, spec.name)
        self.live: dict = {}  # run() ref -> (pool index, replica, actor)
        self.groups: dict = {}  # (pool index, replica) -> placement group of a multi-GPU replica
        self.incarnations: dict[tuple[int, int], int] = {}
        self.replacements = sum(p.replicas for p in spec.workers) * spec.max_attempts
        self.rows_total = sum(u.num_rows for u in units)

    def spawn(self, pool_index: int, replica: int) -> None:
        name = self.spec.pool_names()[pool_index]
        n = self.incarnations[(pool_index, replica)] = self.incarnations.get((pool_index, replica), -1) + 1
        actor = self.ray.remote(Worker).options(
            name=f"{name}-{replica}" + (f".{n}" if n else ""), namespace=self.namespace, max_restarts=0,
            runtime_env=WORKER_ENV,
            **self.placement(pool_index, replica),
        ).remote(self.spec, pool_index, replica, self.coordinator, self.run_id)
        self.live[actor.run.remote()] = (pool_index, replica, actor)

    def placement(self, pool_index: int, replica: int) -> dict:
        """Ray options that place one replica. A vLLM replica spanning several GPUs gets a placement group
        of one {GPU: 1} bundle per GPU (kept for the replica's replacements too): the actor holds no GPU
        itself, and vLLM's Ray executor puts one engine worker in each bundle."""
        pool = self.spec.workers[pool_index]
        accel = accelerator(pool)
        if pool.gpus_per_replica <= 1:
            return {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus,
                    "resources": {**pool.resources, **accel} or None}
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        key = (pool_index, replica)
        if key not in self.groups:
            bundles = [{"GPU": 1.0, **accel} for _ in range(pool.gpus_per_replica)]
            bundles[0].update({"CPU": pool.num_cpus, **pool.resources})  # the actor's own share
            self.groups[key] = placement_group(bundles, strategy="PACK" if pool.spans_nodes else "STRICT_PACK",
                                               name=f"{self.namespace}-{self.spec.pool_names()[pool_index]}-{replica}")
        return {"num_cpus": pool.num_cpus, "num_gpus": 0, "resources": dict(pool.resources) or None,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.groups[key], placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}

    def run(self, show_progress: bool) -> list[tuple[Unit, str]]:
        for i, pool in enumerate(self.spec.workers):
            for r in range(pool.replicas):
                self.spawn(i, r)
        try:
            with Progress(self.rows_total, show_progress) as bar:
                while self.live:
                    ready, _ = self.ray.wait(list(self.live), num_returns=1, timeout=1.0)
                    for ref in ready:
                        self._reap(ref)
                    progress = self.ray.get(self.coordinator.progress.remote())
                    bar.update(progress)
                    if progress["finished"]:
                        break  # every unit is committed; a replica still waiting for a node is not needed
                    if self._too_many_failed(progress):
                        break
            progress = self.ray.get(self.coordinator.progress.remote())
            given_up = self.ray.get(self.coordinator.given_up.remote())
        finally:
            self.close()
        if not progress["finished"] and not self._too_many_failed(progress):
            raise JobFailedError(f"job {self.spec.name}: every worker was lost; last error: {progress['last_error']}")
        return given_up

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
        for _, _, actor in self.live.values():
            self.ray.kill(actor, no_restart=True)
        self.live.clear()
        self.ray.kill(self.coordinator, no_restart=True)
        from ray.util.placement_group import remove_placement_group

        for group in self.groups.values():
            remove_placement_group(group)
        self.groups.clear()

    def _reap(self, ref) -> None:
        pool_index, replica, actor = self.live.pop(ref)
        name = f"{self.spec.pool_names()[pool_index]}-{replica}"
        try:
            self.ray.get(ref)
            return
        except self.ray.exceptions.RayError as e:
            error = short_error(e)
        self.ray.kill(actor, no_restart=True)
        lost = self.ray.get(self.coordinator.worker_lost.remote(name, error))
        log.warning("worker %s lost (%s); %d units back in the queue", name, error, len(lost))
        finished = self.ray.get(self.coordinator.progress.remote())["finished"]
        if not finished and self.replacements > 0:
            self.replacements -= 1
            self.spawn(pool_index, replica)


def short_error(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return f"{type(e).__name__}: {text}"[:500]


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
