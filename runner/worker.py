"""The worker: a thin Ray actor shell around one engine, reading units ahead and committing them behind."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from runner.batching import END, BatchLoop, UnitWork
from runner.engines import create_engine
from runner.errors import InputError
from runner.output import OutputStore, output_table, unit_stats
from runner.plan import Unit
from runner.rows import read_rows
from runner.spec import JobSpec
from runner.storage import prime_parquet, retrying

log = logging.getLogger(__name__)


class RowGroupReader:
    """Reads a unit's row groups; keeps the last row group so slices of a large one are read once."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        inp = spec.input
        wanted = [inp.row_column, inp.sampling_column, inp.id_column, *inp.columns]
        self.columns = list(dict.fromkeys(c for c in wanted if c))
        self.cached: tuple[tuple, pa.Table] | None = None

    @retrying
    def _read(self, url: str, groups: tuple[int, ...]) -> pa.Table:
        key = (url, groups)
        if self.cached and self.cached[0] == key:
            return self.cached[1]
        fs, path = url_to_fs(url, **self.spec.input.storage_options)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_groups(list(groups), columns=self.columns)
        self.cached = (key, table)
        return table

    def read(self, unit: Unit, attempt: int) -> UnitWork:
        try:
            table = self._read(unit.source_file, unit.row_groups).slice(unit.skip, unit.num_rows)
        except (pa.ArrowInvalid, FileNotFoundError) as e:
            raise InputError(f"{unit.source_file}: cannot read rows {unit.row_start}+{unit.num_rows} ({e})") from e
        return UnitWork(unit, attempt, table, read_rows(table, self.spec))


class UnitFeed:
    """Background thread: leases units from the coordinator and reads them, `prefetch` ahead."""

    def __init__(self, coordinator, reader: RowGroupReader, worker: str, prefetch: int, lease_units: int = 1):
        self.coordinator, self.reader, self.worker, self.lease_units = coordinator, reader, worker, lease_units
        self.ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.thread = threading.Thread(target=self._run, name=f"feed-{worker}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import ray

        while True:
            try:
                lease = ray.get(self.coordinator.next_units.remote(self.worker, self.lease_units))
            except ray.exceptions.RayActorError:  # the job is being stopped: no more units
                self.ready.put(END)
                return
            if lease.state == "done":
                self.ready.put(END)
                return
            if lease.state == "wait":
                time.sleep(0.2)
                continue
            for unit, attempt in zip(lease.units, lease.attempts):
                try:
                    self.ready.put(self.reader.read(unit, attempt))
                except Exception as e:
                    log.warning("%s: %s", self.worker, e)
                    self.coordinator.fail.remote(self.worker, unit.id, f"read_error: {e}")

    def get(self, block: bool):
        try:
            return self.ready.get(block=block, timeout=None if block else 0)
        except queue.Empty:
            return None


class Worker:
    """One engine, fed by a UnitFeed; finished units are committed on a writer thread."""

    def __init__(self, spec: JobSpec, pool_index: int, replica: int, coordinator, run_id: str):
        import ray

        self.pool_index, self.pool = pool_index, spec.pool_names()[pool_index]
        self.name = f"{self.pool}-{replica}"
        self.spec, self.coordinator, self.run_id = spec, coordinator, run_id
        self.node = ray.get_runtime_context().get_node_id()
        threading.Thread(target=_exit_with_raylet, args=(os.getppid(), self.name), daemon=True).start()
        self.engine = create_engine(spec.workers[pool_index], spec)
        prime_parquet()
        self.store = OutputStore(spec)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self.tokens = 0

    def __repr__(self) -> str:  # Ray shows it in the dashboard and before each of this actor's log lines
        return f"Worker({self.name})"

    def run(self) -> dict:
        """Work until the coordinator has nothing left; returns this worker's totals."""
        started = time.time()
        feed = UnitFeed(self.coordinator, RowGroupReader(self.spec), self.name, self.spec.prefetch_units,
                        self.spec.units_per_lease(self.pool_index))
        try:
            BatchLoop(self.engine, feed, self._commit_later, self.spec.sampling).run()  # close() waits for commits
        finally:
            self.close()
        wall = time.time() - started
        return {"worker": self.name, "completion_tokens": self.tokens, "wall_s": wall}

    def _commit_later(self, work: UnitWork) -> None:
        self.writer.submit(self._commit, work)

    def _commit(self, work: UnitWork) -> None:
        unit = work.unit
        try:
            table = output_table(self.spec, unit, work.inputs, work.results)
            stats = unit_stats(unit, work.results, pool=self.pool, worker=self.name, node=self.node,
                               run_id=self.run_id, attempt=work.attempt, started_at=work.started_at,
                               finished_at=time.time())
            self.store.commit(unit, table, stats)
        except Exception as e:
            log.error("%s: commit of %s failed: %s", self.name, unit.id, e)
            self.coordinator.fail.remote(self.name, unit.id, f"commit_error: {e}")
            return
        self.tokens += stats.completion_tokens
        totals = {"rows": stats.rows, "rows_ok": stats.rows_ok, "rows_failed": stats.rows_failed,
                  "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens}
        self.coordinator.complete.remote(self.name, unit.id, totals, self.pool)

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        self.engine.close()


def _exit_with_raylet(raylet_pid: int, name: str) -> None:
    """A worker process outlives its raylet when the node's Ray is killed (a driver's embedded Ray dying with
    it): it would hold its engine's memory, and might still commit units, forever. Ray starts each worker
    from its raylet, so a changed parent means the raylet is gone; the worker follows it."""
    while os.getppid() == raylet_pid:
        time.sleep(1.0)
    log.error("%s: its raylet (pid %d) is gone; exiting", name, raylet_pid)
    os._exit(1)
