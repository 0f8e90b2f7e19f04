"""The driver: validate, plan, claim the output, run the pools on Ray, commit the manifest."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyarrow as pa

from runner.cluster.progress import Timings
from runner.cluster.ray import RunOptions
from runner.engines.base import Completion
from runner.errors import JobFailedError, RunnerError
from runner.inputs.formats import input_format
from runner.inputs.plan import make_plan
from runner.inputs.reader import open_reader
from runner.inputs.units import Plan, Unit
from runner.output.files import Publisher
from runner.output.ledger import Ledger
from runner.output.lock import JobLock
from runner.output.report import FAILED_POOL, write_report
from runner.output.store import OutputStore, UnitStats, summarize
from runner.spec.job import JobSpec, check_models
from runner.storage.location import storage_errors

if TYPE_CHECKING:
    from runner.cluster.ray import RayCluster  # imported where a job runs: `runner validate` needs no Ray

log = logging.getLogger(__name__)


def validate(spec: JobSpec) -> Plan:
    """Every check that needs no engine: inputs, models, output location. Returns the plan."""
    plan = make_plan(spec)
    check_models(spec)
    OutputStore(spec).check_writable()
    return plan


DEFAULT_OPTIONS = RunOptions()  # an embedded local Ray, a dashboard and a progress bar


def run_job(spec: JobSpec, resolved_spec: dict, options: RunOptions = DEFAULT_OPTIONS) -> dict:
    """Run (or resume) the job to the end; returns the manifest. Raises RunnerError subclasses.
    Logs where the run's seconds went (runner.progress.Timings) when it ends."""
    # A caller's mistake, not a user's: run_job(spec, RunOptions()) would record the options as the spec.
    for arg, value, kind in (("spec", spec, JobSpec), ("resolved_spec", resolved_spec, dict),
                             ("options", options, RunOptions)):
        if not isinstance(value, kind):
            raise TypeError(f"run_job: {arg} must be a {kind.__name__}, got {type(value).__name__}; call "
                            "run_job(spec, resolved, options) with the (spec, resolved) pair that load_spec returns")
    from runner.cluster.ray import RayCluster, import_ray_meanwhile

    started = time.time()
    timings = Timings()
    timings.mark("start")
    if options.address:  # before the run plans and claims its output: a cluster that is not there is the one line
        from runner.cluster.address import check_address

        check_address(options.address)
    plan = validate(spec)
    timings.mark("plan")
    import_ray_meanwhile()  # while the lock is taken and the output location claimed
    store = OutputStore(spec)
    run_id = uuid.uuid4().hex[:12]
    # Every refusal (a bad input, another driver's lock, another job's outputs) comes before Ray starts, so
    # it is the one line printed.
    with JobLock(store.loc, spec.name, run_id) as lock:
        cluster = RayCluster(spec, run_id, options)
        try:
            manifest = _run_locked(spec, resolved_spec, options, plan, store, run_id, started, lock, cluster,
                                   timings)
        finally:
            cluster.stop()  # its workers are gone before the lock is
    timings.log()
    return manifest


def _run_locked(spec: JobSpec, resolved_spec: dict, options: RunOptions, plan: Plan, store: OutputStore,
                run_id: str, started: float, lock: JobLock, cluster: RayCluster, timings: Timings) -> dict:
    resuming = store.begin(plan, resolved_spec, options.overwrite)
    input_format(spec).keep(store.loc, plan)
    before = Ledger.resume(store.loc)  # the segments, and only the markers not yet folded into one
    timings.mark("claim")
    done = before.committed_ids
    todo = [u for u in plan.units if u.id not in done]
    log.info("job %s: %d units, %d rows; %d units already committed%s", spec.name, len(plan.units),
             plan.total_rows, len(plan.units) - len(todo), " (resuming)" if resuming else "")
    given_up: list[tuple[Unit, str]] = []
    known: list[UnitStats] = []
    if todo:
        from runner.cluster.ray import run_on_ray

        allowed = failed_rows_allowed(spec, plan.total_rows)
        if allowed is not None:  # what earlier runs' committed units already used up
            allowed -= before.totals().get("rows_failed", 0)
        given_up, known = run_on_ray(spec, todo, run_id, options, failed_allowed=allowed, lock=lock,
                                     timings=timings, cluster=cluster, ledger=before)
    lock.check()  # a driver that took the location over while this one's workers ran finishes the job
    dim = next((m.embedding_dim for m in (*known, *before.stats) if m.embedding_dim), 0)

    def write_results() -> dict:
        """The given-up units' rows, written as failed, then the manifest: storage work that needs no Ray."""
        before.add(known + [write_failed_unit(spec, store, unit, error, run_id, dim) for unit, error in given_up])
        before.catch_up()  # what a lost coordinator did not report: the driver's ledger is the whole job's now
        return finish(spec, store, plan, run_id, started, skipped=len(plan.units) - len(todo), ledger=before,
                      events=timings.events)

    # With every unit of this run settled no worker holds one, so the results are written while Ray stops; a
    # run stopped early stops Ray first, so that no worker told to stop commits behind the manifest.
    if len(known) + len(given_up) < len(todo) and cluster.stop():
        timings.mark("ray stop")
    return _while_ray_stops(cluster, timings, write_results)


def _while_ray_stops(cluster: RayCluster, timings: Timings, write: Callable[[], dict]) -> dict:
    """`write()` on a helper thread while this one stops Ray, if it still runs; returns what `write` does."""
    with ThreadPoolExecutor(1, thread_name_prefix="finish") as helper:
        writing = helper.submit(lambda: (write(), time.time()))
        ends = [("ray stop", time.time())] if cluster.stop() else []
        manifest, written_at = writing.result()
    for phase, at in sorted([*ends, ("finish", written_at)], key=lambda end: end[1]):
        timings.mark(phase, at)
    return manifest


def write_failed_unit(spec: JobSpec, store: OutputStore, unit: Unit, error: str, run_id: str,
                      embedding_dim: int = 0) -> UnitStats:
    """A unit that failed every attempt: its rows are written with the error, through the workers' commit
    path, so none is lost. Returns its stats. `embedding_dim`: the width of the job's committed vectors
    (task embed), so every part has one schema; 0 only when no unit has any."""
    try:
        inputs = open_reader(spec).read(unit, 0).inputs
    except Exception:  # the input itself may be what fails; keep the rows' positions at least
        cols = input_format(spec).copied_columns
        inputs = pa.table({c: pa.nulls(unit.num_rows) for c in cols} or {"_": pa.nulls(unit.num_rows)})
    message = f"unit_failed: after {spec.max_attempts} attempts: {error}"[:2000]
    results = [Completion.failed(i, message) for i in range(unit.num_rows)]
    now = time.time()
    stats = store.commit_results(unit, inputs, results, embedding_dim, pool=FAILED_POOL, worker=FAILED_POOL,
                                 run_id=run_id, attempt=spec.max_attempts, started_at=now, finished_at=now)
    log.error("%s: rows %d..%d written as failed after %d attempts: %s", unit.id, unit.row_start,
              unit.row_start + unit.num_rows - 1, spec.max_attempts, error)
    return stats


def finish(spec: JobSpec, store: OutputStore, plan: Plan, run_id: str, started: float, skipped: int,
           known: Iterable[UnitStats] = (), ledger: Ledger | None = None, events: list[dict] = ()) -> dict:
    """Write the manifest and the report, and fold the markers into the ledger; raise JobFailedError if the job
    is not done. `known`: the stats the driver has (this run's coordinator's and the ledger's it began with), so
    none of those markers is read again;
    `ledger`: the one loaded at the start when nothing has been committed since; `events`: what happened
    to the cluster during the run (nodes lost and joined, workers lost), which the report marks."""
    ledger = ledger or Ledger.load(store.loc, known)
    plan_ids = {u.id for u in plan.units}
    missing = sorted(plan_ids - ledger.units.keys())
    Publisher(store.loc, spec.output.target_file_mb, run_id).publish(ledger, final=not missing)
    mine = [m for m in ledger.stats if m.unit_id in plan_ids]
    summary = summarize(mine, spec.pool_names(), run_id)
    wall = time.time() - started
    this_run = [m for m in mine if m.run_id == run_id]
    new_tokens = sum(m.completion_tokens for m in this_run)
    manifest = {
        "name": spec.name, "run_id": run_id, "fingerprint": spec.fingerprint(),
        "rows_total": plan.total_rows, "units_total": len(plan.units), "units_committed": len(mine),
        "units_skipped": skipped, "units_this_run": len(this_run), "wall_time_s": round(wall, 3),
        "rows_per_s": round(sum(m.rows for m in this_run) / wall, 2) if wall else 0.0,
        "tokens_per_s": round(new_tokens / wall, 1) if wall else 0.0,
        **summary, "events": list(events), "files": sorted({m.data_name for m in mine}),
        "spec": (store.job_record() or {}).get("spec"),
    }
    if input_format(spec).request_counts:  # as the OpenAI Batch API counts its requests
        manifest["request_counts"] = {"total": plan.total_rows, "completed": manifest.get("rows_ok", 0),
                                      "failed": manifest.get("rows_failed", 0)}
    failed_limit = exceeds_failed_limit(spec, manifest.get("rows_failed", 0), plan.total_rows)
    ok = not missing and not failed_limit
    manifest["status"] = "succeeded" if ok else "failed"
    store.finish(manifest, ok)
    _write_summaries(store, ledger, mine)
    if failed_limit:
        unrun = f"; stopped with {len(missing)} units not run" if missing else ""
        raise JobFailedError(f"job {spec.name}: {failed_limit}{unrun}; failed rows by error: "
                             f"{manifest.get('errors')}")
    if missing:
        raise JobFailedError(f"job {spec.name}: {len(missing)} units were not committed (first: {missing[0]})")
    return manifest


def _write_summaries(store: OutputStore, ledger: Ledger, mine: list[UnitStats]) -> None:
    """The report, and the markers folded into the ledger. The rows and the manifest are what count: a failure
    here is a warning, since a report can be written later and the next load reads the markers left."""
    try:
        log.info("report: %s", write_report(store.loc, mine))
    except RunnerError as e:
        log.warning("no report written: %s (runner report %s writes it)", e, store.loc.url)
    try:
        ledger.fold()
    except RunnerError as e:
        log.warning("markers not folded into the ledger: %s (the next run reads them instead)", e)


def failed_rows_allowed(spec: JobSpec, total: int) -> float | None:
    """max_failed_rows as a row count: a fraction below 1 is of all the job's rows."""
    limit = spec.max_failed_rows
    if limit is None:
        return None
    return limit * total if isinstance(limit, float) and limit < 1 else limit


def exceeds_failed_limit(spec: JobSpec, failed: int, total: int) -> str | None:
    allowed = failed_rows_allowed(spec, total)
    if allowed is not None and failed > allowed:
        return f"{failed} of {total} rows failed, more than max_failed_rows ({spec.max_failed_rows})"
    return None


def job_status(spec: JobSpec) -> dict:
    """What the output location says about the job: units done/total, rows ok/failed."""
    store = OutputStore(spec)
    with storage_errors(f"output.path: {spec.output.path}"):
        record = store.job_record()
        markers = Ledger.load(store.loc).stats if record else []  # read-only: never rolls
        succeeded = store.succeeded() if record else False
    summary = summarize(markers, spec.pool_names())
    return {
        "name": spec.name, "started": record is not None, "succeeded": succeeded,
        "units_total": record["units"] if record else None, "rows_total": record["rows"] if record else None,
        "units_done": len(markers), **summary,
    }
