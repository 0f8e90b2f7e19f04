"""Output files of about `output.target_file_mb`: committed units' rows wait under `_parts/`, and are written
into `part-NNNNN.parquet` files, whole, each unit's rows in exactly one file.

The job lock's holder writes a file in steps that are each safe to crash after: an intent (`_files/`, the
file's name and units), then the file in one write (an object store's upload completes at once; a local
disk renames into place), then the units' ledger rows naming the file; only then are their waiting parts and
the intent removed. The next publisher finishes an intent whose units' rows do not name its file yet by
writing the same file again, from the same parts. A reader of `*.parquet` or of the directory never sees a
waiting part, nor a unit in two files: before, while and after files are written.
"""

from __future__ import annotations

import io
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq

from runner.output.ledger import Ledger
from runner.output.store import UnitStats, check_fence, staged_name
from runner.storage.conditional import beside
from runner.storage.location import Location, is_local, retrying, storage_errors
from runner.storage.names import FILES, STAGED

log = logging.getLogger(__name__)

FILE = re.compile(r"part-(\d{5,})\.parquet")


class Publisher:
    """Writes the ledger's waiting units into output files of about `target_mb` (0: units are their own
    files, nothing to do). `run_id`: the run whose driver must hold the job lock (checked before each file)."""

    def __init__(self, loc: Location, target_mb: float, run_id: str | None = None):
        self.loc, self.target, self.run_id = loc, target_mb * 1e6, run_id
        self.seq: int | None = None  # the next file's number, once the ledger and the intents are read

    def publish(self, ledger: Ledger, final: bool = False) -> list[str]:
        """Write each file that the waiting units fill, in unit order; with `final` (every unit committed),
        the rest into a last, smaller one, and what earlier crashes left under `_parts/` goes. Returns the
        names written."""
        if self.target <= 0:
            return []
        if self.seq is None:
            self._recover(ledger)
            self.seq = 1 + max((int(m.group(1)) for s in ledger.units.values() if (m := FILE.fullmatch(s.file))),
                               default=-1)
        groups, group, size = [], [], 0
        for s in ledger.stats:
            if not s.file and s.part_bytes:
                group.append(s)
                size += s.part_bytes
                if size >= self.target:
                    groups.append(group)
                    group, size = [], 0
        if final and group:
            groups.append(group)
        written = []
        for g in groups:
            written.append(f"part-{self.seq:05d}.parquet")
            self.seq += 1
            self._write(ledger, written[-1], g)
        if final:
            self._remove_leftovers(ledger)
        return written

    def _write(self, ledger: Ledger, name: str, group: list[UnitStats]) -> None:
        intent = f"{FILES}/{name.removesuffix('.parquet')}.json"
        with storage_errors(f"{self.loc.url_of(name)}: cannot write the output file"):
            if self.run_id is not None:
                check_fence(self.loc, self.run_id, f"{name} is not written")
            self.loc.write_json(intent, {"file": name, "units": [s.unit_id for s in group]})
            rows = concatenate(self.loc, name, [s.data_name for s in group])
        ledger.settle([replace(s, file=name) for s in group])
        with storage_errors(f"{self.loc.url}: cannot remove the parts written into {name}"):
            self.loc.remove([staged_name(s.unit_id) for s in group] + [intent])
        log.info("%s: %d units, %d rows, %.1f MB", self.loc.url_of(name), len(group), rows,
                 sum(s.part_bytes for s in group) / 1e6)

    def _recover(self, ledger: Ledger) -> None:
        """Finish the files an earlier publisher began: written again from their parts unless their units'
        rows name them already."""
        with storage_errors(f"{self.loc.url_of(FILES)}: cannot read the output files being written"):
            intents = [(n, self.loc.read_json(n)) for n in self.loc.list(FILES) if n.endswith(".json")]
        for intent, record in intents:
            group = [ledger.units[uid] for uid in record["units"] if uid in ledger.units]
            if group and any(s.file != record["file"] for s in group):
                log.warning("%s: finishing the output file a run began", self.loc.url_of(record["file"]))
                with storage_errors(f"{self.loc.url_of(record['file'])}: cannot write the output file"):
                    concatenate(self.loc, record["file"], [staged_name(s.unit_id) for s in group])
                ledger.settle([replace(s, file=record["file"]) for s in group])
            with storage_errors(f"{self.loc.url}: cannot remove the parts written into {record['file']}"):
                self.loc.remove([staged_name(s.unit_id) for s in group] + [intent])

    def _remove_leftovers(self, ledger: Ledger) -> None:
        """Waiting parts of units already in a file (a crash between a file's rows and the parts' removal, or
        a late worker committing a unit again)."""
        with storage_errors(f"{self.loc.url_of(STAGED)}: cannot remove leftover parts"):
            names = self.loc.list(STAGED)
            done = [n for n in names if (s := ledger.units.get(n.rsplit("/", 1)[-1].removesuffix(".part")))
                    and s.file]
            self.loc.remove(done)


class OutputWriter:
    """The driver's ledger and output files while a run goes: each batch of the run's commits is added, folded
    in and written into the files it fills on a thread of its own, so the supervisor's loop never waits on
    storage. `lock`: the driver's JobLock; without one nothing is written, only added."""

    def __init__(self, ledger: Ledger, target_mb: float, run_id: str, lock=None):
        self.ledger, self.lock = ledger, lock
        self.publisher = Publisher(ledger.loc, target_mb, run_id)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self.pending: Future | None = None

    def busy(self) -> bool:
        return self.pending is not None and not self.pending.done()

    def take(self, new: list[UnitStats]) -> None:
        """Add `new` and write, on the writer's thread, once the last batch is done (its error raised here)."""
        self.wait()
        self.pending = self.pool.submit(self._write, new)

    def _write(self, new: list[UnitStats]) -> None:
        self.ledger.add(new)
        if self.lock is not None:
            self.lock.check()  # only the lock's holder writes
            self.ledger.fold()
            self.publisher.publish(self.ledger)

    def wait(self) -> None:
        """The batch in flight done; its error (a storage error, the lock lost) raised."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


READ_AHEAD = 32  # parts read at once (in parallel) while a file is written: bounds the driver's memory


@retrying
def concatenate(loc: Location, name: str, parts: list[str]) -> int:
    """Write `parts` (Parquet objects under `loc`), in order, as the one Parquet object `name`, READ_AHEAD
    parts at a time, read in parallel; returns its rows. The schema is the first parts' unified one; where a
    later part has a column typed where they had only nulls (a unit whose input could not be read comes
    first), the file is written again with every part's schema unified."""
    with ThreadPoolExecutor(16, thread_name_prefix="concatenate") as pool:
        try:
            return _write_file(loc, name, parts, pool, None)
        except pa.ArrowException:
            schemas = list(pool.map(lambda part: pq.read_schema(io.BytesIO(loc.read_bytes(part))), parts))
            return _write_file(loc, name, parts, pool, pa.unify_schemas(schemas, promote_options="permissive"))


def _write_file(loc: Location, name: str, parts: list[str], pool: ThreadPoolExecutor, schema: pa.Schema | None
                ) -> int:
    path = loc.path(name)
    target = beside(path) if is_local(loc.fs) else path
    out, writer, rows = loc.fs.open(target, "wb"), None, 0
    try:
        for i in range(0, len(parts), READ_AHEAD):
            tables = list(pool.map(lambda part: pq.read_table(io.BytesIO(loc.read_bytes(part))),
                                   parts[i:i + READ_AHEAD]))
            if writer is None:
                schema = schema or pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
                writer = pq.ParquetWriter(out, schema, compression="zstd")
            for table in tables:
                writer.write_table(table.select(schema.names).cast(schema))
                rows += table.num_rows
        writer.close()
    except BaseException:
        _abandon(loc, out, target != path and target)
        raise
    out.close()
    if target != path:
        loc.fs.mv(target, path)
    return rows


def _abandon(loc: Location, out, temp: str | bool) -> None:
    """A file whose writing failed is never completed: an object store's upload is discarded (s3fs aborts
    it, and the file is unusable after, so its close may fail), a local temp file removed."""
    try:
        getattr(out, "discard", lambda: None)()
        out.close()
    except Exception:  # noqa: BLE001 - what matters is that nothing was completed
        pass
    if temp and loc.fs.exists(temp):
        loc.fs.rm_file(temp)
