"""JSONL files as input, whatever their lines hold: indexed by newline offsets in one pass, cut into units of
whole lines, read by byte range. A file's index is kept in the output location (`_inputs/`), so a resume plans
from it instead of reading the file again while the file's size and version are the same.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from fsspec.core import url_to_fs

from runner.errors import InputError
from runner.inputs.base import InputFormat
from runner.inputs.listing import list_inputs, reading, size_and_version
from runner.inputs.units import InputFile, Plan, Unit, UnitWork, new_unit
from runner.spec.job import JobSpec
from runner.storage.location import Location, retrying, storage_errors
from runner.storage.names import INDEXES

CHUNK = 16 << 20  # bytes read at a time while indexing
BLANK = ("", "")  # the keys of a blank line

Keys = tuple[str | None, str | None]


@dataclass(frozen=True)
class LineIndex:
    """One file's lines: `starts[i]` is line i's first byte and `starts[-1]` the end of the last one.

    `keys[i]`: two strings the format noted of line i while indexing, None where it noted nothing; BLANK for a
    blank line. The first is an identity the format checks for repeats (openai_batch: custom_id), the second a
    tag of few distinct values (openai_batch: the url; jsonl: the JSON kinds of the line's copied values)."""

    starts: np.ndarray
    keys: list[Keys]

    @property
    def lines(self) -> int:
        return len(self.starts) - 1


def blank_or_not(line: bytes) -> Keys:
    """Keys that note nothing of a line but whether it is blank."""
    return (None, None) if line.strip() else BLANK


def line_object(line: bytes) -> dict | None:
    """A non-blank line's JSON object; None for a line that is not one (not JSON, or JSON of another kind)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


@retrying
def index_lines(fs, path: str, keys_of: Callable[[bytes], Keys] = blank_or_not) -> LineIndex:
    """One pass over the file: each line's start, and its keys. Blank lines at the end of the file are not
    lines; a blank line before the last one is (a row error)."""
    starts, keys, offset, tail = [0], [], 0, b""
    with fs.open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            buf = tail + chunk
            ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10)
            base = offset - len(tail)
            prev = 0
            for e in ends.tolist():
                keys.append(keys_of(buf[prev:e]))
                prev = e + 1
            starts.extend((ends + 1 + base).tolist())
            tail, offset = buf[prev:], offset + len(chunk)
    if tail:
        keys.append(keys_of(tail))
        starts.append(offset)
    while keys and keys[-1] == BLANK:  # trailing blank lines
        keys.pop()
        starts.pop()
    return LineIndex(np.asarray(starts, np.int64), keys)


def _kept_name(url: str, tagged: str) -> str:
    key = url if not tagged else f"{url}\n{tagged}"
    return f"{INDEXES}/{hashlib.sha256(key.encode()).hexdigest()[:20]}.arrow"


def kept_index(loc: Location, url: str, size: int, version: str, tagged: str = "") -> LineIndex | None:
    """The index an earlier run kept for this file, if the file still has that size and version token and
    the keys were noted for the same `tagged` (what they depend on of the job's settings)."""
    if not version:  # a store without version tokens: only reading the file again is sure
        return None
    try:
        table = loc.read_arrow(_kept_name(url, tagged))
    except (OSError, pa.ArrowInvalid):  # none kept, or unreadable: the file is read again
        return None
    meta = table.schema.metadata or {}
    if [meta.get(k) for k in (b"url", b"size", b"version")] != [url.encode(), str(size).encode(), version.encode()]:
        return None
    starts = np.concatenate([table.column("start").to_numpy(), [int(meta[b"end"])]])
    # by position: indexes kept before the keys had general names call them custom_id and url
    return LineIndex(starts, list(zip(table.column(1).to_pylist(), table.column(2).to_pylist(), strict=True)))


def keep_indexes(loc: Location, plan: Plan, tagged: str = "") -> None:
    """Keep the plan's new line indexes in the output location (`_inputs/`), each with its file's identity."""
    files = {f.url: f for f in plan.files}
    for url, index in plan.new_indexes.items():
        f = files[url]
        ids, tags = zip(*index.keys, strict=True) if index.keys else ((), ())
        table = pa.table({"start": pa.array(index.starts[:-1], pa.int64()), "key": pa.array(ids, pa.string()),
                          "tag": pa.array(tags, pa.string()).dictionary_encode()})
        table = table.replace_schema_metadata({"url": url, "size": str(f.size), "version": f.version,
                                               "end": str(int(index.starts[-1]))})
        with storage_errors(f"{loc.url_of(_kept_name(url, tagged))}: cannot keep the line index of {url}"):
            loc.write_arrow(_kept_name(url, tagged), table)


def cut_line_units(file_index: int, f: InputFile, index: LineIndex, unit_rows: int,
                   repeats: dict[int, str] | None = None, **fields) -> list[Unit]:
    """Units of unit_rows whole lines, each with its byte range; each carries its rows that `repeats` names
    (line -> where its key was first seen) and `fields` (further Unit fields every unit of the file has)."""
    mine: dict[int, list] = defaultdict(list)
    for line, where in sorted((repeats or {}).items()):
        mine[line // unit_rows].append((line % unit_rows, where))
    return [new_unit(file_index, f.url, start, min(unit_rows, index.lines - start),
                     byte_range=(int(index.starts[start]), int(index.starts[min(start + unit_rows, index.lines)])),
                     repeats=tuple(mine[start // unit_rows]), **fields)
            for start in range(0, index.lines, unit_rows)]


class LineFormat(InputFormat):
    """A format of JSONL files: each file indexed once (or from its kept index), units of whole lines."""

    suffix = ".jsonl"

    @abstractmethod
    def index(self, fs, path: str) -> LineIndex:
        """One pass over a file (index_lines with this format's keys)."""

    @property
    def tagged(self) -> str:
        """What the keys depend on of the job's settings: a kept index serves a plan that asks the same only."""
        return ""

    def indexed(self) -> list[tuple[InputFile, LineIndex, bool]]:
        """Every input file, in order: its identity, its line index, and whether the index was read from the
        file (not kept)."""
        inp = self.spec.input
        listed = list_inputs(inp.path, inp.storage_options, suffix=self.suffix)
        kept = Location.open(self.spec.output.path, self.spec.output.storage_options)
        with ThreadPoolExecutor(max_workers=min(8, len(listed))) as pool:
            return list(pool.map(lambda item: self._index(kept, *item), listed))

    def _index(self, kept: Location, url: str, listed: dict) -> tuple[InputFile, LineIndex, bool]:
        size, version = size_and_version(url, self.spec.input.storage_options, listed)
        index = kept_index(kept, url, size, version, self.tagged)
        fresh = index is None
        if fresh:
            fs, path = url_to_fs(url, **self.spec.input.storage_options)
            with reading(url):
                index = self.index(fs, path)
        return InputFile(url, index.lines, (index.lines,), size, version), index, fresh

    def keep(self, loc: Location, plan: Plan) -> None:
        keep_indexes(loc, plan, self.tagged)


class LineReader(ABC):
    """Reads a unit's lines (its byte range only); `to_work` turns them into rows, each bad line a row error."""

    def __init__(self, spec: JobSpec):
        self.spec = spec

    @retrying
    def _read(self, url: str, start: int, end: int) -> bytes:
        fs, path = url_to_fs(url, **self.spec.input.storage_options)
        with fs.open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def read(self, unit: Unit, attempt: int) -> UnitWork:
        start, end = unit.byte_range
        try:
            data = self._read(unit.source_file, start, end)
        except FileNotFoundError as e:
            raise InputError(f"{unit.source_file}: cannot read lines {unit.row_start + 1}+{unit.num_rows} ({e})") from e
        lines = (data[:-1] if data.endswith(b"\n") else data).split(b"\n")
        if len(data) != end - start or len(lines) != unit.num_rows:
            raise InputError(f"{unit.source_file}: lines {unit.row_start + 1}+{unit.num_rows} are not where they "
                             "were planned; the file changed while the job ran")
        return self.to_work(unit, attempt, lines)

    @abstractmethod
    def to_work(self, unit: Unit, attempt: int, lines: list[bytes]) -> UnitWork:
        """The unit's rows from its lines (`\\r` left on a CRLF line's end: JSON reads it as whitespace)."""
