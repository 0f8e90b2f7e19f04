"""A job on Ray: start or join Ray, then run the job's coordinator and worker pools on it under a Supervisor."""

from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass

from runner.cluster.address import check_address
from runner.cluster.placement import check_fits
from runner.cluster.progress import Timings
from runner.cluster.supervisor import Supervisor
from runner.errors import ClusterError, first_line
from runner.inputs.units import Unit
from runner.spec.job import JobSpec
from runner.worker.crashes import quiet_ray_terminal

log = logging.getLogger(__name__)

# Ray starts worker processes at nice 15, below everything else on the node; an engine is the node's main
# work, so it runs at the default priority, as a bare vLLM or llama.cpp process would (Ray's job supervisor
# does the same for drivers). Merged with the job's own runtime env by Ray. An embedded Ray is started with
# that priority for all its workers instead (NICE_WORKERS), so actors take the worker processes Ray starts
# ahead, where a runtime env of their own would have each wait for a new process.
WORKER_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}
NICE_WORKERS = {"worker_niceness": 0}


def run_on_ray(spec: JobSpec, units: list[Unit], run_id: str, options, failed_allowed: float | None = None,
               lock=None, timings: Timings | None = None, cluster: RayCluster | None = None,
               ledger=None) -> tuple[list[tuple[Unit, str]], list]:
    """Process `units` on Ray until each is committed or given up; returns the given-up ones and the stats
    of those committed. Stops early, leaving units unrun, once more than `failed_allowed` rows have failed,
    or when `lock` (the driver's JobLock) is found taken by another driver. `cluster`: the run's Ray, started
    here if it is not yet, which the caller stops; without it, a Ray of its own, stopped before returning.
    `timings` gets the run's phases; `ledger` (runner.output.ledger.Ledger): what is committed, which the run's
    commits are added to and, under `lock`, folded into as they come."""
    timings = timings or Timings()
    own = cluster is None
    cluster = cluster or RayCluster(spec, run_id, options)
    try:
        if cluster.start():
            timings.mark("ray start")
        check_fits(spec, embedded=not options.address)
        worker_env = None if cluster.nice_workers else WORKER_ENV
        return Supervisor(spec, units, run_id, failed_allowed, lock, worker_env, timings,
                          ledger=ledger).run(options.progress)
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


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None  # None: an embedded local Ray
    overwrite: bool = False
    dashboard: bool = True
    progress: bool = True
