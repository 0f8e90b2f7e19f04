"""Calibration: one replica of a pool runs a sample of the job's rows on Ray (written nowhere) and times its
start, its model load and its rate with the engine kept full."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
from collections import deque
from contextlib import contextmanager

from pydantic import BaseModel, Field

from runner.errors import EngineError, RunnerError
from runner.inputs.units import Unit, UnitWork
from runner.spec.job import JobSpec
from runner.spec.pools import PoolBase
from runner.worker.batching import END, BatchLoop

CALIBRATE_FILLS = 4  # a calibration runs at least this many times the engine's capacity in rows ...
CALIBRATE_MIN_S = 2.0  # ... for at least this long, so that the rate is a steady one ...
CALIBRATE_MAX_S = 60.0  # ... and stops taking rows after this long, whatever is left of the sample
CALIBRATE_READ_S = 30.0  # the replica reads rows beyond the driver's sample for at most this long


class Calibration(BaseModel):
    """What one replica did with a real sample of the job's rows (written nowhere)."""

    rows: int = Field(description="Rows the replica ran.")
    capacity: int = Field(description="Sequences the engine keeps in flight.")
    rows_per_s: float = Field(description="Rows one replica finishes per second with its engine kept full.")
    tokens_per_s: float = Field(description="Generated tokens per second of one replica.")
    mean_completion_tokens: float = Field(description="Mean generated tokens per row that succeeded.")
    rows_failed: int = Field(description="Sample rows that failed (each is counted in rows_per_s too).")
    model_load_s: float = Field(description="Seconds the engine took to load the model.")
    replica_start_s: float = Field(description="Seconds from asking Ray for the replica to its engine being "
                                               "ready: placement, the worker's start and imports, the model load.")


def calibrate_pools(spec: JobSpec, works: list[UnitWork], units: tuple[Unit, ...], address: str | None
                    ) -> tuple[list[Calibration], float]:
    """Start Ray as a job does (keeping a connection this process has); returns each pool's calibration and
    the seconds Ray took to start (0 when it was already connected). `works`: the sample the driver read;
    `units`: the job's, of which each replica reads more where its engine holds more than the sample fills."""
    import ray  # not timed: a job imports Ray while it plans

    from runner.cluster.placement import check_fits
    from runner.cluster.ray import WORKER_ENV, RayCluster, RunOptions

    started = time.time()

    cluster = RayCluster(spec, f"plan-{uuid.uuid4().hex[:8]}", RunOptions(address=address, progress=False))
    try:
        ray_start_s = time.time() - started if cluster.start() else 0.0
        check_fits(spec, embedded=not address)
        env = None if cluster.nice_workers else WORKER_ENV
        refs = ray.put(works), ray.put(units)
        return [calibrate_pool(spec, i, *refs, env) for i in range(len(spec.workers))], round(ray_start_s, 3)
    finally:
        cluster.stop()


def calibrate_pool(spec: JobSpec, index: int, works_ref, units_ref, env: dict | None) -> Calibration:
    """One replica of pool `index`, placed as the job places it, runs the sample; a RunnerError it raises
    (a model that cannot load) is raised here as itself."""
    import ray

    from runner.errors import short_error

    name = spec.pool_names()[index]
    with placed(spec.workers[index]) as options:
        asked = time.time()
        replica = ray.remote(SampleReplica).options(max_restarts=0, runtime_env=env, **options).remote()
        try:
            out = ray.get(replica.run.remote(spec, index, works_ref, units_ref))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RunnerError):
                raise e.cause from None
            raise EngineError(f"pool {name}: the calibration run failed ({short_error(e)})") from None
        except ray.exceptions.RayError as e:  # the worker died (a native crash, out of memory)
            raise EngineError(f"pool {name}: the calibration run failed ({short_error(e)})") from None
        finally:
            ray.kill(replica)  # its process, whose stdout run_sample redirected and which held an engine, goes
    out["replica_start_s"] = round(time.time() - asked - out.pop("run_s"), 3)
    return Calibration(**out)


class SampleReplica:
    """The replica a calibration runs on: an actor, as a job's replicas are. vLLM hands its engine core the
    placement group of a replica spanning several GPUs, and the address of the Ray that holds it, only from
    inside an actor: from a task, its Ray executor would start a Ray of its own."""

    def run(self, spec: JobSpec, index: int, works: list[UnitWork], units: tuple[Unit, ...]) -> dict:
        return run_sample(spec, index, works, units)


@contextmanager
def placed(pool: PoolBase):
    """Ray options that place one replica as a job places it; a multi-GPU replica's placement group is
    removed afterwards."""
    from runner.cluster.placement import replica_group, replica_options

    if pool.gpus_per_replica <= 1:
        yield replica_options(pool)
        return
    from ray.util.placement_group import remove_placement_group

    group = replica_group(pool)
    try:
        yield replica_options(pool, group)
    finally:
        remove_placement_group(group)


def run_sample(spec: JobSpec, index: int, works: list[UnitWork], units: tuple[Unit, ...] = ()) -> dict:
    """On one replica's resources: load the pool's engine, read more of the job's `units` where the sample
    cannot fill the engine CALIBRATE_FILLS times, and run them through BatchLoop; the Calibration's fields,
    less replica_start_s, plus the seconds from the engine's load to the end (`run_s`)."""
    from runner.engines.build import create_engine, load_error, warm_up

    pool, name = spec.workers[index], spec.pool_names()[index]
    # Ray shows a worker's stdout on the driver's stdout: what the engine prints (vLLM logs there, its engine
    # processes too) goes to stderr instead, so that `runner plan --json` prints JSON alone.
    sys.stdout.flush()
    os.dup2(2, 1)
    started = time.time()
    try:
        engine = create_engine(pool, spec)
    except Exception as e:  # as Worker.load says it
        raise load_error(name, pool, e) from None
    loaded = time.time()
    try:
        try:
            warm_up(engine)  # as a job's replica does before it takes units
        except Exception as e:
            raise load_error(name, pool, e, "cannot decode with") from None
        works = read_more(spec, works, units, CALIBRATE_FILLS * engine.capacity, loaded + CALIBRATE_READ_S)
        feed = SampleFeed(works, engine.capacity)
        feed.loop = BatchLoop(engine, feed, feed.done, spec.sampling)
        fed = time.time()
        feed.loop.run()
    finally:
        engine.close()
    ended = time.time()
    run_s = ended - loaded
    rows, seconds = feed.steady if feed.steady[0] >= engine.capacity else (feed.fed, ended - fed)
    rate = rows / seconds if seconds > 0 else 0.0
    ok = [c for c in feed.completions if c.error is None]
    mean = sum(_generated(c) for c in ok) / len(ok) if ok else 0.0
    return {"rows": feed.fed, "capacity": engine.capacity, "rows_per_s": round(rate, 2),
            "tokens_per_s": round(rate * mean, 1), "mean_completion_tokens": round(mean, 2),
            "rows_failed": feed.fed - len(ok), "model_load_s": round(loaded - started, 3), "run_s": run_s}


def read_more(spec: JobSpec, works: list[UnitWork], units: tuple[Unit, ...], rows: int, deadline: float
              ) -> list[UnitWork]:
    """The sample's works and, while they hold fewer than `rows` rows and `deadline` has not passed, more of
    the job's units read here, spread over the job as the sample's are: the driver reads its sample before
    any engine says how many rows fill it (a GPU vLLM holds thousands of sequences)."""
    have = sum(len(w.rows.prompts) for w in works)
    if have >= rows or not units:
        return works
    from runner.inputs.reader import open_reader

    reader, works, read = open_reader(spec), list(works), {w.unit.id for w in works}
    while have < rows and time.time() < deadline:
        rest = [u for u in units if u.id not in read]
        if not rest:
            break
        for unit in sample_units(rest, rows - have):  # a few rows short at most: the loop takes more
            works.append(reader.read(unit, 0))
            read.add(unit.id)
            have += len(works[-1].rows.prompts)
            if have >= rows or time.time() >= deadline:
                break
    return works


def sample_units(units: tuple[Unit, ...] | list[Unit], target: int) -> list[Unit]:
    """Whole units spread evenly over the job, about `target` rows in all; every unit of a smaller job."""
    total = sum(u.num_rows for u in units)
    if total <= target:
        return list(units)
    k = max(1, round(len(units) * target / total))
    return [units[i * len(units) // k] for i in range(k)]


def _generated(c) -> int:
    return sum(ch.completion_tokens for ch in c.choices) if c.choices else c.completion_tokens


class SampleFeed:
    """Hands BatchLoop the sample in pieces of the engine's capacity until enough has run (CALIBRATE_*).
    `steady`: (rows finished, seconds) when the loop first had a free slot and nothing to fill it, i.e. the
    engine's rate while it was kept full, as a job keeps it."""

    def __init__(self, works: list[UnitWork], capacity: int):
        self.pieces = deque(piece for work in works for piece in split_work(work, max(1, capacity)))
        self.min_rows = CALIBRATE_FILLS * capacity
        self.completions: list = []  # of the pieces finished
        self.loop: BatchLoop | None = None
        self.started: float | None = None
        self.fed = 0
        self.steady = (0, 0.0)

    def get(self, block: bool):
        self.started = self.started or time.time()
        elapsed = time.time() - self.started
        enough = self.fed >= self.min_rows and elapsed >= CALIBRATE_MIN_S
        if not self.pieces or enough or elapsed >= CALIBRATE_MAX_S:
            self.steady = (self.fed - len(self.loop.owners), elapsed)
            return END
        work = self.pieces.popleft()
        self.fed += len(work.rows.prompts)
        return work

    def done(self, work: UnitWork) -> None:
        self.completions.extend(work.results)


def split_work(work: UnitWork, size: int) -> list[UnitWork]:
    """A unit's rows in pieces of at most `size`. Every per-row field of Rows is cut (lists by position, the
    `bad` dict by row index), whatever fields Rows has, so a field added to it is cut too."""
    rows, n = work.rows, len(work.rows.prompts)
    pieces = []
    for a in range(0, n, size):
        b = min(n, a + size)
        cut = {}
        for f in dataclasses.fields(rows):
            value = getattr(rows, f.name)
            if isinstance(value, list) and len(value) == n:
                cut[f.name] = value[a:b]
            elif isinstance(value, dict):
                cut[f.name] = {i - a: v for i, v in value.items() if a <= i < b}
        pieces.append(UnitWork(work.unit, 0, work.inputs.slice(a, b - a), dataclasses.replace(rows, **cut)))
    return pieces
