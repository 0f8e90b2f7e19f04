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

from runner.batching import END, BatchLoop, UnitWork
from runner.errors import EngineError, ModelError, RunnerError, first_line
from runner.pools import PoolBase
from runner.spec import JobSpec

CALIBRATE_FILLS = 4  # a calibration runs at least this many times the engine's capacity in rows ...
CALIBRATE_MIN_S = 2.0  # ... for at least this long, so that the rate is a steady one ...
CALIBRATE_MAX_S = 60.0  # ... and stops taking rows after this long, whatever is left of the sample


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


def calibrate_pools(spec: JobSpec, works: list[UnitWork], address: str | None) -> tuple[list[Calibration], float]:
    """Start Ray as a job does (keeping a connection this process has); returns each pool's calibration and
    the seconds Ray took to start (0 when it was already connected)."""
    from runner.cluster import WORKER_ENV, RayCluster, check_fits
    from runner.job import RunOptions

    import ray  # not timed: a job imports Ray while it plans

    started = time.time()

    cluster = RayCluster(spec, f"plan-{uuid.uuid4().hex[:8]}", RunOptions(address=address, progress=False))
    try:
        ray_start_s = time.time() - started if cluster.start() else 0.0
        check_fits(spec, embedded=not address)
        env = None if cluster.nice_workers else WORKER_ENV
        ref = ray.put(works)
        return [calibrate_pool(spec, i, ref, env) for i in range(len(spec.workers))], round(ray_start_s, 3)
    finally:
        cluster.stop()


def calibrate_pool(spec: JobSpec, index: int, works_ref, env: dict | None) -> Calibration:
    """One replica of pool `index`, placed as the job places it, runs the sample; a RunnerError it raises
    (a model that cannot load) is raised here as itself."""
    import ray

    from runner.cluster import short_error

    name = spec.pool_names()[index]
    with placed(spec.workers[index]) as options:
        # max_calls=1: the worker process, whose stdout run_sample redirects and which held an engine, exits after
        task = ray.remote(max_calls=1)(run_sample).options(max_retries=0, runtime_env=env, **options)
        asked = time.time()
        try:
            out = ray.get(task.remote(spec, index, works_ref))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RunnerError):
                raise e.cause from None
            raise EngineError(f"pool {name}: the calibration run failed ({short_error(e)})") from None
        except ray.exceptions.RayError as e:  # the worker died (a native crash, out of memory)
            raise EngineError(f"pool {name}: the calibration run failed ({short_error(e)})") from None
    out["replica_start_s"] = round(time.time() - asked - out.pop("run_s"), 3)
    return Calibration(**out)


@contextmanager
def placed(pool: PoolBase):
    """Ray options that place one replica as a job places it; a multi-GPU replica's placement group is
    removed afterwards."""
    from runner.cluster import replica_group, replica_options

    if pool.gpus_per_replica <= 1:
        yield replica_options(pool)
        return
    from ray.util.placement_group import remove_placement_group

    group = replica_group(pool)
    try:
        yield replica_options(pool, group)
    finally:
        remove_placement_group(group)


def run_sample(spec: JobSpec, index: int, works: list[UnitWork]) -> dict:
    """On one replica's resources: load the pool's engine and run the sample through BatchLoop; the
    Calibration's fields, less replica_start_s, plus the seconds the run took (`run_s`)."""
    from runner.engines import create_engine

    pool, name = spec.workers[index], spec.pool_names()[index]
    # Ray shows a worker's stdout on the driver's stdout: what the engine prints (vLLM logs there, its engine
    # processes too) goes to stderr instead, so that `runner plan --json` prints JSON alone.
    sys.stdout.flush()
    os.dup2(2, 1)
    started = time.time()
    try:
        engine = create_engine(pool, spec)
    except Exception as e:  # as Worker.load says it
        model = getattr(pool, "model", None) or pool.engine
        raise ModelError(f"pool {name}: cannot load {model}: {first_line(e).removeprefix(f'{model}: ')}") from None
    loaded = time.time()
    feed = SampleFeed(works, engine.capacity)
    try:
        feed.loop = BatchLoop(engine, feed, feed.done, spec.sampling)
        feed.loop.run()
    finally:
        engine.close()
    run_s = time.time() - loaded
    rows, seconds = feed.steady if feed.steady[0] >= engine.capacity else (feed.fed, run_s)
    rate = rows / seconds if seconds > 0 else 0.0
    ok = [c for c in feed.completions if c.error is None]
    mean = sum(_generated(c) for c in ok) / len(ok) if ok else 0.0
    return {"rows": feed.fed, "capacity": engine.capacity, "rows_per_s": round(rate, 2),
            "tokens_per_s": round(rate * mean, 1), "mean_completion_tokens": round(mean, 2),
            "rows_failed": feed.fed - len(ok), "model_load_s": round(loaded - started, 3), "run_s": run_s}


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
