"""JSONL input (`format: jsonl`): one JSON object per line, whose keys are the columns the job names.

`prompt_column` (a string) or `messages_column` (a list of {role, content}, or its JSON text) is each line's
row, `sampling_column` (an object, or its JSON text) its sampling laid over the job's. `id_column` and
`columns` are copied to the output, each with one type across the whole input: bool, int64, double or string
where every line's value is that JSON kind (or null, or missing), else each value's JSON text. Files:
`*.jsonl` under a directory, a file or a glob; any fsspec URL. Units are ranges of whole lines read by byte
range (runner.inputs.lines); a line that is empty, not a JSON object, without its prompt or with a value of the
wrong type is that row's error.
"""

from __future__ import annotations

import json

import pyarrow as pa

from runner.errors import InputError
from runner.inputs.lines import (
    BLANK,
    Keys,
    LineFormat,
    LineIndex,
    LineReader,
    blank_or_not,
    cut_line_units,
    index_lines,
    line_object,
)
from runner.inputs.rows import Rows, messages_of, overrides
from runner.inputs.units import Plan, Unit, UnitWork
from runner.spec.job import JobSpec

_ARROW = {"null": pa.null(), "bool": pa.bool_(), "int64": pa.int64(), "double": pa.float64(), "string": pa.string()}
# The column type that holds every kind seen (n: null or missing), first fit; none fits: JSON text.
_FITS = (("null", set()), ("bool", {"b"}), ("int64", {"i"}), ("double", {"i", "f"}), ("string", {"s"}))


class JsonlFormat(LineFormat):
    """jsonl: one JSON object per line, rows from the keys the job names, as a Parquet job's columns."""

    def index(self, fs, path: str) -> LineIndex:
        columns = self.copied_columns
        if not columns:  # nothing to type: only the newlines are read
            return index_lines(fs, path, blank_or_not)
        return index_lines(fs, path, lambda line: _kinds(line, columns))

    @property
    def tagged(self) -> str:
        """Each line's tag holds the JSON kinds of the copied columns' values, in this order."""
        return json.dumps(self.copied_columns) if self.copied_columns else ""

    def plan(self) -> Plan:
        indexed = self.indexed()
        types = column_types(self.copied_columns, [index for _, index, _ in indexed])
        files, units, new = [], [], {}
        for i, (f, index, fresh) in enumerate(indexed):
            if fresh:
                new[f.url] = index
            files.append(f)
            units += cut_line_units(i, f, index, self.spec.unit_rows, column_types=types)
        return Plan(tuple(files), tuple(units), new)

    def reader(self) -> JsonlReader:
        return JsonlReader(self.spec, self.copied_columns)


def _kind(v) -> str:
    if v is None:
        return "n"
    if isinstance(v, bool):
        return "b"
    if isinstance(v, int):
        return "i" if -(1 << 63) <= v < 1 << 63 else "j"
    return "f" if isinstance(v, float) else "s" if isinstance(v, str) else "j"


def _kinds(line: bytes, columns: list[str]) -> Keys:
    """A line's tag: one kind letter per copied column; None for a line that is not a JSON object."""
    if not line.strip():
        return BLANK
    obj = line_object(line)
    return (None, None if obj is None else "".join(_kind(obj.get(c)) for c in columns))


def column_types(columns: list[str], indexes: list[LineIndex]) -> tuple[tuple[str, str], ...]:
    """Each copied column's type across every file's lines: the first of _FITS that holds every kind seen."""
    tags = {tag for index in indexes for tag in index.tag_counts() if tag and len(tag) == len(columns)}
    out = []
    for j, c in enumerate(columns):
        seen = {tag[j] for tag in tags} - {"n"}
        out.append((c, next((name for name, fits in _FITS if seen <= fits), "json")))
    return tuple(out)


class JsonlReader(LineReader):
    """Turns each line of a unit into a row, or a row error; the copied values become typed columns."""

    def __init__(self, spec: JobSpec, copied: list[str]):
        super().__init__(spec)
        self.copied = copied

    def to_work(self, unit: Unit, attempt: int, lines: list[bytes]) -> UnitWork:
        inp = self.spec.input
        bad: dict[int, str] = {}
        objs = [_object(raw, unit.row_start + row + 1, row, bad) for row, raw in enumerate(lines)]
        for row, obj in enumerate(objs):
            if obj is not None and inp.row_column not in obj:
                bad[row] = f"missing_column: line {unit.row_start + row + 1} has no {inp.row_column!r}"
        sources = [None if obj is None or row in bad else obj[inp.row_column] for row, obj in enumerate(objs)]
        if inp.messages_column:
            prompts = messages_of(sources, bad)
        else:
            prompts = [_prompt(v, unit.row_start + row + 1, inp.row_column, row, bad) for row, v in enumerate(sources)]
        prompts = ["" if row in bad else p for row, p in enumerate(prompts)]
        rows = Rows(prompts, bad=bad)
        if inp.sampling_column:
            asked = [None if obj is None else obj.get(inp.sampling_column) for obj in objs]
            rows.samplings = overrides(asked, self.spec.sampling, bad)
        return UnitWork(unit, attempt, self._copied(unit, objs), rows)

    def _copied(self, unit: Unit, objs: list[dict | None]) -> pa.Table:
        """The copied columns, typed as planned; a table of no columns still has the unit's rows."""
        types = dict(unit.column_types)
        cols = {c: _array([None if obj is None else obj.get(c) for obj in objs], types.get(c, "json"), unit, c)
                for c in self.copied}
        return pa.table(cols) if cols else pa.table({"_": pa.nulls(len(objs))}).select([])


def _object(raw: bytes, line: int, row: int, bad: dict[int, str]) -> dict | None:
    """A line's JSON object, or None with the row's error in `bad`."""
    if not raw.strip():
        bad[row] = f"bad_line: line {line} is empty"
        return None
    try:
        obj = json.loads(raw)
    except ValueError as e:
        bad[row] = f"bad_json: line {line} is not valid JSON ({e})"
        return None
    if not isinstance(obj, dict):
        bad[row] = f"bad_line: line {line}: expected a JSON object, got {type(obj).__name__}"
        return None
    return obj


def _prompt(v, line: int, column: str, row: int, bad: dict[int, str]) -> str | None:
    if v is None or isinstance(v, str):
        return v  # a null prompt is the row's null_prompt, as in a Parquet column
    bad[row] = f"bad_type: line {line}: {column!r} is {json.dumps(v)[:40]}, expected a string"
    return ""


def _array(values: list, type_name: str, unit: Unit, column: str) -> pa.Array:
    if type_name == "json":
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())
    try:
        return pa.array(values, _ARROW[type_name])
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
        raise InputError(f"{unit.source_file}: lines {unit.row_start + 1}+{unit.num_rows}: {column!r} no longer "
                         f"holds {type_name} values as planned; the file changed while the job ran ({e})") from e
