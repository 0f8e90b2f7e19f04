"""The ledger: which units are committed and their stats, as segments under `_ledger/` plus the commit markers
not yet folded into one.

A unit is committed exactly when its marker stands in `_commits/` or a ledger segment has its row. The driver
that holds the job lock folds markers in once FOLD_AT of them wait: it writes their rows as a new segment, and
only then removes the markers. So status and a resume read a few segments and list only the markers written
since the last fold, however many units a job has committed; a crash between the two steps leaves a unit in
both places, which is the same unit once.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import pyarrow as pa

from runner.output.store import UnitStats, list_markers, read_markers, summarize
from runner.storage.location import Location, storage_errors
from runner.storage.names import COMMITS, LEDGER

log = logging.getLogger(__name__)

# Arrow IPC, not Parquet: readers globbing the output's `*.parquet` (DuckDB, polars) must not pick it up.
FOLD_AT = 256  # markers waiting before the lock's holder folds them into a segment and removes them
MERGE_AT = 32  # segments before a fold writes every row as one and removes the others

_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(),
          "dict[str, int]": pa.map_(pa.string(), pa.int64())}
SCHEMA = pa.schema([(f.name, _TYPES[f.type]) for f in fields(UnitStats)])  # a new field needs its type here


@dataclass
class Ledger:
    """What is committed, read cheaply: one listing of `_ledger/` and its segments read in parallel, one
    listing of `_commits/`, and a parallel read of only the markers in neither the segments nor `known`
    (the stats this run's coordinator already reported)."""

    loc: Location
    units: dict[str, UnitStats]
    segments: list[str]  # the segments read, oldest first: a fold that merges replaces them
    folded: set[str] = field(default_factory=set)  # units with a row in a segment
    standing: dict[str, str] = field(default_factory=dict)  # unit id -> its marker, listed but already folded
    markers_read: int = 0  # markers this load had to read one by one

    @classmethod
    def load(cls, loc: Location, known: Iterable[UnitStats] = ()) -> Ledger:
        known, cache = list(known), {}
        for _ in range(3):  # a marker folded in between its listing and its read: load again
            segments, rows = read_segments(loc, cache)  # before the markers: a fold writes its segment first
            listed = list_markers(loc)
            units = {**{s.unit_id: s for s in known}, **rows}  # a segment's row wins: it may name the unit's file
            new = [name for uid, name in listed.items() if uid not in units]
            read = read_markers(loc, new)
            if None not in read:
                break
        units.update((s.unit_id, s) for s in read if s is not None)
        standing = {uid: name for uid, name in listed.items() if uid in rows}
        log.debug("ledger %s: %d units, %d in %d segments, %d markers read, %d folded markers still standing",
                  loc.url, len(units), len(rows), len(segments), len(new), len(standing))
        return cls(loc, units, segments, set(rows), standing, len(new))

    @classmethod
    def resume(cls, loc: Location) -> Ledger:
        """For a driver resuming under the job lock: one load, then a fold if FOLD_AT markers wait."""
        ledger = cls.load(loc)
        ledger.fold()
        return ledger

    def catch_up(self) -> None:
        """Add the units whose markers stand but which this ledger does not hold (a lost coordinator's last
        commits): one listing of `_commits/`, and only those markers read."""
        listed = list_markers(self.loc)
        new = [name for uid, name in listed.items() if uid not in self.units]
        self.add(s for s in read_markers(self.loc, new) if s is not None)

    def refresh(self) -> None:
        """Load again in place (what a lost coordinator took with it is read from the markers)."""
        fresh = Ledger.load(self.loc, self.units.values())
        self.units, self.segments, self.folded, self.standing = (fresh.units, fresh.segments, fresh.folded,
                                                                 fresh.standing)

    @property
    def stats(self) -> list[UnitStats]:
        """Every committed unit's stats, in unit id order."""
        return [self.units[uid] for uid in sorted(self.units)]

    @property
    def committed_ids(self) -> set[str]:
        return set(self.units)

    @property
    def waiting(self) -> int:
        """Committed units whose rows are in no segment yet."""
        return len(self.units) - len(self.folded)

    def add(self, stats: Iterable[UnitStats]) -> None:
        """Units this run's workers committed (their markers stand until a fold)."""
        for s in stats:
            self.units.setdefault(s.unit_id, s)

    def totals(self, pools: Iterable[str] = (), run_id: str | None = None) -> dict:
        """Rows, tokens and errors added up, per pool and per worker (runner.output.summarize)."""
        return summarize(self.stats, list(pools), run_id)

    def fold(self, at: int | None = None) -> int:
        """Once `at` (default FOLD_AT) units wait (or markers of units already in a segment stand), write them
        as a segment (every row as one, when MERGE_AT segments are there), then remove their markers; returns
        how many were folded. Only the job lock's holder calls it."""
        waiting = sorted(uid for uid in self.units if uid not in self.folded)
        if len(waiting) + len(self.standing) < max(FOLD_AT if at is None else at, 1):
            return 0
        if waiting:
            self._write([self.units[uid] for uid in waiting])
        else:  # only markers of units already in a segment (settled into files)
            with storage_errors(f"{self.loc.url_of(COMMITS)}: cannot remove folded markers"):
                self.loc.remove(list(self.standing.values()))
            self.standing = {}
        return len(waiting)

    def settle(self, stats: list[UnitStats]) -> None:
        """Units whose rows moved into an output file: their new rows written as a segment now (a later
        segment's row wins). Their markers stand until a fold removes them with its own (a job of fewer than
        FOLD_AT units keeps them). Only the job lock's holder calls it."""
        for s in stats:
            self.units[s.unit_id] = s
        self._write(stats, markers=False)

    def _write(self, rows: list[UnitStats], markers: bool = True) -> None:
        merge = len(self.segments) + 1 >= MERGE_AT
        name = f"{LEDGER}/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.arrow"  # later names win a unit
        ids = [s.unit_id for s in rows]
        with storage_errors(f"{self.loc.url_of(name)}: cannot write the ledger"):
            self.loc.write_arrow(name, summary_table(self.stats if merge else rows))
            self.folded.update(ids)
            old, self.segments = (self.segments, [name]) if merge else ([], [*self.segments, name])
            mine = {uid: f"{COMMITS}/{uid}.json" for uid in ids}
            self.loc.remove((list(mine.values()) + list(self.standing.values()) if markers else []) + old)
        self.standing = {} if markers else {**self.standing, **mine}
        log.debug("ledger %s: %d units written into %s%s", self.loc.url, len(ids), name,
                  f", merging {len(old)} segments" if merge else "")


def summary_table(stats: list[UnitStats]) -> pa.Table:
    """A segment: one row a unit, UnitStats' fields as typed columns (`errors` a map)."""
    return pa.table({f.name: pa.array([getattr(s, f.name) for s in stats], f.type) for f in SCHEMA}, schema=SCHEMA)


def read_segments(loc: Location, cache: dict | None = None) -> tuple[list[str], dict[str, UnitStats]]:
    """The segment names under `_ledger/`, oldest first, and {unit id: stats} from them (a later segment's row
    wins). A segment that cannot be parsed is skipped with a warning: its units run again, into the same
    objects. A storage error is raised. `cache`: {name: rows} of segments read before (a segment never
    changes), so a load that lists again reads only the new ones."""
    cache = {} if cache is None else cache
    for _ in range(3):  # a segment merged away between the listing and its read: list again
        with storage_errors(f"{loc.url_of(LEDGER)}: cannot read the ledger"):
            names = [n for n in loc.list(LEDGER) if n.endswith(".arrow")]
            with ThreadPoolExecutor(max_workers=16) as pool:
                for n, rows in zip([n for n in names if n not in cache],
                                   pool.map(lambda n: _read_segment(loc, n), [n for n in names if n not in cache]),
                                   strict=True):
                    if rows is not None:
                        cache[n] = rows
        tables = [cache.get(n) for n in names]
        if all(t is not None for t in tables):
            break
    rows: dict[str, UnitStats] = {}
    for stats in tables:
        rows.update((s.unit_id, s) for s in stats or ())
    return names, rows


def _read_segment(loc: Location, name: str) -> list[UnitStats] | None:
    """A segment's rows; None when it is gone."""
    try:
        table = loc.read_arrow(name).select(SCHEMA.names).cast(SCHEMA)
        cols = [table.column(f.name).to_pylist() for f in SCHEMA]
        stats = [UnitStats(**dict(zip(SCHEMA.names, values, strict=True))) for values in zip(*cols, strict=True)]
    except FileNotFoundError:  # merged away by the lock's holder since the listing
        return None
    except (pa.ArrowException, KeyError, TypeError, ValueError) as e:
        log.warning("%s: unreadable (%s); its units count as not committed and run again", loc.url_of(name), e)
        return []
    for s in stats:
        s.errors = dict(s.errors or ())  # an Arrow map reads back as (key, value) pairs
        s.pool, s.worker, s.run_id, s.node = (sys.intern(s.pool), sys.intern(s.worker), sys.intern(s.run_id),
                                              sys.intern(s.node))  # a few distinct values over many units
    return stats
