"""The ledger: every committed unit's stats, from one rolled-up summary plus the markers written since."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, fields

import pyarrow as pa

from runner.output.store import UnitStats, list_markers, read_markers, summarize
from runner.storage.location import Location, storage_errors
from runner.storage.names import LEDGER

log = logging.getLogger(__name__)

# Arrow IPC, not Parquet: readers globbing the output's `*.parquet` (DuckDB, polars) must not pick it up.
ROLL_AFTER = 1000  # a resuming driver rolls the summary when it had to read more markers than this

_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(),
          "dict[str, int]": pa.map_(pa.string(), pa.int64())}
SCHEMA = pa.schema([(f.name, _TYPES[f.type]) for f in fields(UnitStats)])  # a new field needs its type here


@dataclass
class Ledger:
    """What `_commits/` says, read cheaply. The listing of `_commits/` is the truth of what is committed;
    a unit's stats come from this run's own (`known`), else the summary `_ledger.arrow`, else its marker.
    A summary row whose marker is no longer listed is dropped, and the next roll leaves it out."""

    loc: Location
    stats: list[UnitStats]  # in unit id order
    markers_read: int  # markers this load had to read one by one
    dropped: int  # summary rows without a listed marker
    rolled: bool  # the summary on storage holds exactly `stats`

    @classmethod
    def load(cls, loc: Location, known: Iterable[UnitStats] = ()) -> Ledger:
        """One listing, one summary read, and a parallel read of only the markers in neither."""
        listed = list_markers(loc)
        summary = read_summary(loc)
        have = {**summary, **{s.unit_id: s for s in known}}
        new = [name for uid, name in listed.items() if uid not in have]
        have.update((s.unit_id, s) for s in read_markers(loc, new))
        stats = [have[uid] for uid in listed]
        dropped = sum(uid not in listed for uid in summary)
        rolled = not dropped and len(summary) == len(stats) and all(summary.get(s.unit_id) == s for s in stats)
        log.debug("ledger %s: %d units, %d in the summary, %d markers read, %d summary rows dropped",
                  loc.url, len(stats), len(summary) - dropped, len(new), dropped)
        return cls(loc, stats, len(new), dropped, rolled)

    @classmethod
    def resume(cls, loc: Location) -> Ledger:
        """For a driver resuming under the job lock: one load, rolled when it read more than ROLL_AFTER
        markers, or dropped rows whose markers were removed (so a unit committed again is read afresh, not
        taken from a stale row)."""
        ledger = cls.load(loc)
        if ledger.markers_read > ROLL_AFTER or ledger.dropped:
            ledger.roll()
        return ledger

    @property
    def committed_ids(self) -> set[str]:
        return {s.unit_id for s in self.stats}

    def totals(self, pools: Iterable[str] = (), run_id: str | None = None) -> dict:
        """Rows, tokens and errors added up, per pool and per worker (runner.output.summarize)."""
        return summarize(self.stats, list(pools), run_id)

    def roll(self) -> None:
        """Write `_ledger.arrow` with every unit loaded, so the next load reads none of their markers.
        Only the driver that holds the job lock calls it; a summary that already holds them is left alone."""
        if self.rolled:
            return
        with storage_errors(f"{self.loc.url_of(LEDGER)}: cannot write the ledger"):
            self.loc.write_arrow(LEDGER, summary_table(self.stats))
        self.rolled = True


def summary_table(stats: list[UnitStats]) -> pa.Table:
    """The summary: one row a unit, UnitStats' fields as typed columns (`errors` a map)."""
    return pa.table({f.name: pa.array([getattr(s, f.name) for s in stats], f.type) for f in SCHEMA}, schema=SCHEMA)


def read_summary(loc: Location) -> dict[str, UnitStats]:
    """{unit id: stats} of `_ledger.arrow`; empty when there is none, or (with a warning) when it cannot be
    parsed, so the ledger is rebuilt from the markers. A storage error is raised, not taken for a missing file."""
    with storage_errors(f"{loc.url_of(LEDGER)}: cannot read the ledger"):
        try:
            table = loc.read_arrow(LEDGER)
        except FileNotFoundError:
            return {}
        except pa.ArrowException as e:
            log.warning("%s: unreadable (%s); rebuilding it from the commit markers", loc.url_of(LEDGER), e)
            return {}
    try:
        table = table.select(SCHEMA.names).cast(SCHEMA)
        cols = [table.column(f.name).to_pylist() for f in SCHEMA]
        stats = [UnitStats(**dict(zip(SCHEMA.names, values, strict=False))) for values in zip(*cols, strict=False)]
    except (pa.ArrowException, OSError, KeyError, TypeError, ValueError) as e:
        log.warning("%s: unreadable (%s); rebuilding it from the commit markers", loc.url_of(LEDGER), e)
        return {}
    for s in stats:
        s.errors = dict(s.errors or ())  # an Arrow map reads back as (key, value) pairs
    return {s.unit_id: s for s in stats}
