"""The records of planned work: input files, units (a fixed set of rows), the plan, and a unit's rows in flight."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby

import pyarrow as pa

from runner.engines.base import Completion
from runner.inputs.rows import Rows

_VERSION_WORDS = {"etag": "ETag", "generation": "generation", "mtime": "modified"}


@dataclass(frozen=True)
class InputFile:
    """One input shard as planned; together its fields are the file's identity, which a resume checks."""

    url: str
    num_rows: int
    row_groups: tuple[int, ...]  # rows in each row group
    size: int  # bytes
    version: str  # "etag:…", "generation:…" or "mtime:…"; "" where the store has none

    def identity(self) -> dict:
        """What the job record keeps of this file: small, and enough to say what changed."""
        return {"url": self.url, "size": self.size, "version": self.version, "rows": self.num_rows,
                "row_groups": row_group_summary(self.row_groups)}


@dataclass(frozen=True, slots=True)  # a plan holds one per unit: 100,000s of them
class Unit:
    """A slice of one input file: whole row groups where they fit, the checkpoint granularity."""

    id: str
    source_file: str
    row_start: int
    num_rows: int
    row_groups: tuple[int, ...]  # row groups to read
    skip: int  # rows of the first row group before row_start
    byte_range: tuple[int, int] | None = None  # a JSONL file's lines: [start, end) bytes instead of row groups
    repeats: tuple[tuple[int, str], ...] = ()  # JSONL rows whose custom_id an earlier line has: (row, where)
    column_types: tuple[tuple[str, str], ...] = ()  # JSONL copied columns: (name, its type across the input)

    @property
    def data_name(self) -> str:
        return part_name(self.id)


def part_name(unit_id: str) -> str:
    """The output object holding a unit's rows, written before its commit marker."""
    return f"{unit_id}.parquet"


@dataclass(frozen=True)
class Plan:
    files: tuple[InputFile, ...]
    units: tuple[Unit, ...]
    # JSONL files indexed by this planning (url -> runner.inputs.lines.LineIndex), which the driver keeps in
    # the output location so that a resume plans from there instead of reading the files again
    new_indexes: dict = field(default_factory=dict, compare=False)

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def fingerprint(self) -> str:
        """Hash of every file's identity: url, rows, row groups, size and version token."""
        return _hash([(f.url, f.num_rows, f.row_groups, f.size, f.version) for f in self.files])

    def rows_fingerprint(self) -> str:
        """Hash of urls and row counts only: what a job record written before `inputs` holds."""
        return _hash([(f.url, f.num_rows) for f in self.files])

    def input_change(self, recorded: list[dict]) -> str | None:
        """The first input file (by url) whose identity differs from the one `recorded`, and how, in words.

        Why a unit id then names the same rows in every run: an id is `part-<file index>-<row_start>`, and
        cut_units derives it from the sorted file list, each file's row groups and unit_rows alone (unit_rows is
        in the spec's fingerprint). Equal urls keep every index; equal row groups keep every cut; an equal size
        and version token (an object store gives an object a new ETag or generation with each write, a disk a
        file a new mtime to the tick of its clock) say the rows behind each id were not rewritten. Checked when
        a run starts: a file rewritten while a run reads it is caught by the next resume, not by that run.
        """
        now = {f.url: f.identity() for f in self.files}
        was = {r["url"]: r for r in recorded}
        for url in sorted(was.keys() | now.keys()):
            if url not in now:
                return f"{url} vanished since the job started"
            if url not in was:
                return f"{url} appeared since the job started"
            changes = _changes(was[url], now[url])
            if changes:
                return f"{url} changed since the job started ({', '.join(changes)})"
        return None


def _hash(body) -> str:
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]


def row_group_summary(groups: Sequence[int]) -> str:
    """Row-group sizes run-length encoded ("6×64+1×16"); a hash past four runs keeps a record small."""
    runs = [f"{len(list(run))}×{n}" for n, run in groupby(groups)]
    if len(runs) <= 4:
        return "+".join(runs) or "none"
    return f"{len(groups)} groups #{_hash(list(groups))[:12]}"


def _changes(was: dict, now: dict) -> list[str]:
    """What differs between two identities of one file, in words."""
    out = [f"{label} {was.get(key)} → {now[key]}{unit}" for key, label, unit in
           (("rows", "rows", ""), ("row_groups", "row groups", ""), ("size", "size", " bytes"))
           if was.get(key) != now[key]]
    old, new = str(was.get("version") or ""), now["version"]
    if old != new:
        kind = new.partition(":")[0]
        if kind in _VERSION_WORDS and old.partition(":")[0] == kind:
            out.append(f"{_VERSION_WORDS[kind]} {old[len(kind) + 1:]} → {new[len(kind) + 1:]}")
        else:
            out.append(f"version {old or 'none'} → {new or 'none'}")
    return out


def new_unit(file_index: int, url: str, row_start: int, n: int, groups: tuple[int, ...] = (), skip: int = 0,
             **lines) -> Unit:
    """A unit named by its file's index and first row: the same rows get the same id in every run.
    `lines`: a JSONL file's byte_range, repeats and column_types (runner.inputs.lines)."""
    return Unit(f"part-{file_index:05d}-{row_start:010d}", url, row_start, n, groups, skip, **lines)


@dataclass
class UnitWork:
    """One unit inside a worker: its input rows and the completions gathered so far."""

    unit: Unit
    attempt: int
    inputs: pa.Table
    rows: Rows
    results: list[Completion | None] = field(default_factory=list)
    remaining: int = 0
    started_at: float = 0.0

    def __post_init__(self):
        self.results = [None] * len(self.rows.prompts)
        self.remaining = len(self.rows.prompts)
