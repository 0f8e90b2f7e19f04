"""Planning: list the input shards, read only their Parquet footers, cut units of work."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import groupby

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol

from runner.errors import InputError, RunnerError, StorageError
from runner.spec import JobSpec
from runner.storage import describe, retrying

_GLOB = set("*?[")


# Where a store's listing keeps its version token, best first, and the kind each is recorded as: an object
# store's token changes with every write of the object; a modification time is the fallback.
_VERSION_KEYS = (("ETag", "etag"), ("etag", "etag"), ("generation", "generation"), ("mtime", "mtime"),
                 ("LastModified", "mtime"), ("last_modified", "mtime"), ("updated", "mtime"))
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


@dataclass(frozen=True)
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
    # JSONL request files indexed by this planning (url -> runner.batchfile.LineIndex), which the driver keeps
    # in the output location so that a resume plans from there instead of reading the files again
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


def make_plan(spec: JobSpec) -> Plan:
    """List and inspect the input; raises InputError naming the file or column at fault."""
    if spec.input.format == "openai_batch":
        from runner.batchfile import plan_batch_files

        return plan_batch_files(spec)
    listed = list_inputs(spec.input.path, spec.input.storage_options)
    with ThreadPoolExecutor(max_workers=min(16, len(listed))) as pool:
        inspected = list(pool.map(lambda item: inspect_file(spec, *item), listed))
    _check_same_types(spec, inspected)
    files = [f for f, _ in inspected]
    units = [u for i, f in enumerate(files) for u in cut_units(i, f, spec.unit_rows)]
    return Plan(tuple(files), tuple(units))


def list_inputs(url: str, storage_options: dict, suffix: str = ".parquet") -> list[tuple[str, dict]]:
    """The input files' urls, sorted, each with the details its listing gave (size, version token, ...);
    a directory stands for every `*<suffix>` file below it."""
    fs, path = url_to_fs(url, **storage_options)
    protocol = get_protocol(url)
    try:
        if _GLOB & set(path):
            found = {p: d for p, d in fs.glob(path, detail=True).items() if d.get("type") == "file"}
        elif _isdir(fs, path):
            found = {p: d for p, d in fs.find(path, detail=True).items()
                     if p.endswith(suffix) and not _hidden(p, path)}
            if not found:
                raise InputError(f"input.path: no *{suffix} files under {url}")
        else:
            found = {path: fs.info(path)}
    except FileNotFoundError:
        raise InputError(f"input.path: {url} does not exist") from None
    except RunnerError:
        raise
    except Exception as e:  # OSError, and an object store client's own errors (unreachable endpoint, auth)
        raise StorageError(f"input.path: cannot list {url}: {describe(e)}") from None
    if not found:
        raise InputError(f"input.path: no files match {url}")
    return [(_with_protocol(protocol, p), found[p]) for p in sorted(found)]


def _isdir(fs, path: str) -> bool:
    fs.invalidate_cache(path)
    return fs.isdir(path)


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root)
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def _with_protocol(protocol: str, path: str) -> str:
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


@retrying
def _footer(fs, path: str) -> pq.FileMetaData:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata


@retrying
def _info(fs, path: str) -> dict:
    return fs.info(path)


@contextmanager
def reading(url: str):
    """Turn a failed read of an input file into an InputError or StorageError that names it."""
    try:
        yield
    except pa.ArrowInvalid as e:
        raise InputError(f"{url}: not a readable Parquet file ({e})") from None
    except FileNotFoundError:
        raise InputError(f"{url}: does not exist") from None
    except OSError as e:
        raise StorageError(f"{url}: cannot read: {describe(e)}") from None


def read_footer(url: str, storage_options: dict) -> pq.FileMetaData:
    fs, path = url_to_fs(url, **storage_options)
    with reading(url):
        return _footer(fs, path)


def size_and_version(url: str, storage_options: dict, listed: dict) -> tuple[int, str]:
    """The file's size and version token from its listing's details, else from one `info` call."""
    details = listed
    if details.get("size") is None or not _version(details):
        fs, path = url_to_fs(url, **storage_options)
        with reading(url):
            details = _info(fs, path)
    return int(details.get("size") or 0), _version(details)


def _version(details: dict) -> str:
    for key, kind in _VERSION_KEYS:
        value = details.get(key)
        if value in (None, ""):
            continue
        if kind == "mtime" and isinstance(value, (int, float)):  # a local file's: seconds since the epoch
            value = datetime.fromtimestamp(value, timezone.utc)
        return f"{kind}:{value.isoformat() if isinstance(value, datetime) else value}"
    return ""


def inspect_file(spec: JobSpec, url: str, listed: dict) -> tuple[InputFile, pa.Schema]:
    """Read one file's footer and check its columns; `listed` is what its listing said of it."""
    size, version = size_and_version(url, spec.input.storage_options, listed)
    meta = read_footer(url, spec.input.storage_options)
    schema = meta.schema.to_arrow_schema()
    inp = spec.input
    source_key = "input.messages_column" if inp.messages_column else "input.prompt_column"
    wanted = [(source_key, inp.row_column)]
    wanted += [("input.sampling_column", inp.sampling_column)] if inp.sampling_column else []
    wanted += [("input.id_column", inp.id_column)] if inp.id_column else []
    wanted += [(f"input.columns[{i}]", c) for i, c in enumerate(inp.columns)]
    for key, col in wanted:
        if col not in schema.names:
            raise InputError(f"{url}: column {col!r} ({key}) not found; columns are {schema.names}")
    ptype = schema.field(inp.row_column).type
    if inp.messages_column:
        if not (_is_text(ptype) or _is_messages(ptype)):
            raise InputError(f"{url}: messages column {inp.messages_column!r} has type {ptype}, expected a list of "
                             "struct<role: string, content: string> or JSON text")
    elif not (_is_text(ptype) or pa.types.is_binary(ptype) or pa.types.is_large_binary(ptype)):
        raise InputError(f"{url}: prompt column {inp.prompt_column!r} has type {ptype}, expected string")
    if inp.sampling_column:
        stype = schema.field(inp.sampling_column).type
        if not (_is_text(stype) or pa.types.is_struct(stype)):
            raise InputError(f"{url}: sampling column {inp.sampling_column!r} has type {stype}, expected a struct "
                             "or a JSON object string")
    groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return InputFile(url, meta.num_rows, groups, size, version), schema


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_messages(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    names = {t.value_type.field(i).name for i in range(t.value_type.num_fields)}
    return {"role", "content"} <= names


def _check_same_types(spec: JobSpec, inspected: list[tuple[InputFile, pa.Schema]]) -> None:
    """Copied columns must have one type across shards, or the output parts would not read as one dataset."""
    cols = spec.input.copied_columns
    first_file, first_schema = inspected[0]
    for f, schema in inspected[1:]:
        for c in cols:
            t, t0 = schema.field(c).type, first_schema.field(c).type
            if not (t.equals(t0) or pa.types.is_null(t) or pa.types.is_null(t0)):
                raise InputError(f"{f.url}: column {c!r} has type {t} but {first_file.url} has {t0}")


def cut_units(file_index: int, f: InputFile, unit_rows: int) -> list[Unit]:
    """Group whole row groups up to unit_rows; split a row group larger than that into slices."""
    units: list[Unit] = []
    start, pending, pending_rows = 0, [], 0

    def flush():
        nonlocal pending, pending_rows
        if pending_rows:
            row0 = start - pending_rows
            units.append(new_unit(file_index, f.url, row0, pending_rows, tuple(pending), 0))
        pending, pending_rows = [], 0

    for g, n in enumerate(f.row_groups):
        if n == 0:
            continue
        if pending_rows + n > unit_rows:
            flush()
        if n > unit_rows:
            for off in range(0, n, unit_rows):
                units.append(new_unit(file_index, f.url, start + off, min(unit_rows, n - off), (g,), off))
        else:
            pending.append(g)
            pending_rows += n
        start += n
    flush()
    return units


def new_unit(file_index: int, url: str, row_start: int, n: int, groups: tuple[int, ...] = (), skip: int = 0,
             **lines) -> Unit:
    """A unit named by its file's index and first row: the same rows get the same id in every run.
    `lines`: a JSONL file's byte_range and repeats (runner.batchfile)."""
    return Unit(f"part-{file_index:05d}-{row_start:010d}", url, row_start, n, groups, skip, **lines)
