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
BLANK_TAG = -2  # a blank line's tag code; -1: a line with no tag

Keys = tuple[str | None, str | None]


@dataclass(frozen=True)
class LineIndex:
    """One file's lines, in arrays, so a file of millions of lines takes tens of MB: `starts[i]` is line i's
    first byte and `starts[-1]` the end of the last one.

    A format notes two keys of each line while indexing: an identity it checks for repeats (openai_batch:
    custom_id), kept as a 64-bit hash in `ids` (0: none), and a tag of few distinct values (openai_batch: the
    url; jsonl: the JSON kinds of the line's copied values), kept as a code in `tags` into `tag_values` (-1:
    none, BLANK_TAG: a blank line)."""

    starts: np.ndarray  # int64, lines + 1
    ids: np.ndarray  # uint64, one a line
    tags: np.ndarray  # int32, one a line
    tag_values: tuple[str, ...]

    @property
    def lines(self) -> int:
        return len(self.starts) - 1

    def tag_counts(self) -> dict[str, int]:
        """How many lines have each tag."""
        counts = np.bincount(self.tags[self.tags >= 0], minlength=len(self.tag_values))
        return {v: int(n) for v, n in zip(self.tag_values, counts, strict=True) if n}


def key_hash(key: str) -> int:
    """A line's identity as the index keeps it: 64 bits of BLAKE2b, never 0 (0 is no identity)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1


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


class _Noter:
    """Turns each line's keys into its (id, tag code), the tag values coded in order of first sight."""

    def __init__(self, keys_of: Callable[[bytes], Keys]):
        self.keys_of, self.codes = keys_of, {}

    def __call__(self, line: bytes) -> tuple[int, int]:
        keys = self.keys_of(line)
        if keys == BLANK:
            return 0, BLANK_TAG
        key, tag = keys
        return (key_hash(key) if key else 0), (-1 if tag is None else self.codes.setdefault(tag, len(self.codes)))

    def chunk(self, lines: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        noted = [self(line) for line in lines]
        return (np.fromiter((i for i, _ in noted), np.uint64, len(noted)),
                np.fromiter((t for _, t in noted), np.int32, len(noted)))


@retrying
def index_lines(fs, path: str, keys_of: Callable[[bytes], Keys] = blank_or_not) -> LineIndex:
    """One pass over the file, a CHUNK at a time: each line's start, and its keys. Blank lines at the end of
    the file are not lines; a blank line before the last one is (a row error)."""
    noter = _Noter(keys_of)
    starts, ids, tags, offset, tail = [np.zeros(1, np.int64)], [], [], 0, b""
    with fs.open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            buf = tail + chunk
            ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10)
            bounds = [0, *(ends + 1).tolist()]
            chunk_ids, chunk_tags = noter.chunk([buf[a:b - 1] for a, b in zip(bounds, bounds[1:], strict=False)])
            ids.append(chunk_ids)
            tags.append(chunk_tags)
            starts.append((ends + 1 + offset - len(tail)).astype(np.int64))
            tail, offset = buf[bounds[-1]:], offset + len(chunk)
    if tail:
        last_ids, last_tags = noter.chunk([tail])
        ids.append(last_ids)
        tags.append(last_tags)
        starts.append(np.array([offset], np.int64))
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
    all_tags = np.concatenate(tags) if tags else np.zeros(0, np.int32)
    n = len(all_tags)
    while n and all_tags[n - 1] == BLANK_TAG:  # trailing blank lines
        n -= 1
    return LineIndex(np.concatenate(starts)[:n + 1], all_ids[:n], all_tags[:n], tuple(noter.codes))


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
    if b"tag_values" not in meta or table.schema.names != ["start", "id", "tag"]:  # kept by an older runner
        return None
    starts = np.concatenate([table.column("start").to_numpy(), [int(meta[b"end"])]])
    return LineIndex(starts, table.column("id").to_numpy().astype(np.uint64),
                     table.column("tag").to_numpy().astype(np.int32), tuple(json.loads(meta[b"tag_values"])))


def keep_indexes(loc: Location, plan: Plan, tagged: str = "") -> None:
    """Keep the plan's new line indexes in the output location (`_inputs/`), each with its file's identity."""
    files = {f.url: f for f in plan.files}
    for url, index in plan.new_indexes.items():
        f = files[url]
        table = pa.table({"start": pa.array(index.starts[:-1], pa.int64()), "id": pa.array(index.ids, pa.uint64()),
                          "tag": pa.array(index.tags, pa.int32())})
        table = table.replace_schema_metadata({"url": url, "size": str(f.size), "version": f.version,
                                               "end": str(int(index.starts[-1])),
                                               "tag_values": json.dumps(index.tag_values)})
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
