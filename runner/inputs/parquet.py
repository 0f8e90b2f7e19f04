"""Parquet inputs: footers, column checks, units cut along row groups, and a unit's row groups read."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from runner.errors import InputError
from runner.inputs.base import InputFormat
from runner.inputs.listing import _footer, list_inputs, reading, size_and_version
from runner.inputs.rows import read_rows
from runner.inputs.units import InputFile, Plan, Unit, UnitWork, new_unit
from runner.spec.job import JobSpec
from runner.storage.location import retrying


class ParquetFormat(InputFormat):
    """parquet: rows from the columns the job names; planned from the files' footers alone."""

    def plan(self) -> Plan:
        spec = self.spec
        listed = list_inputs(spec.input.path, spec.input.storage_options, suffix=self.suffix)
        with ThreadPoolExecutor(max_workers=min(16, len(listed))) as pool:
            inspected = list(pool.map(lambda item: inspect_file(spec, *item), listed))
        _check_same_types(self.copied_columns, inspected)
        files = [f for f, _ in inspected]
        units = [u for i, f in enumerate(files) for u in cut_units(i, f, spec.unit_rows)]
        return Plan(tuple(files), tuple(units))

    def reader(self) -> RowGroupReader:
        return RowGroupReader(self.spec)


def read_footer(url: str, storage_options: dict) -> pq.FileMetaData:
    fs, path = url_to_fs(url, **storage_options)
    with reading(url):
        return _footer(fs, path)


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


def _check_same_types(cols: list[str], inspected: list[tuple[InputFile, pa.Schema]]) -> None:
    """Copied columns must have one type across shards, or the output parts would not read as one dataset."""
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


class RowGroupReader:
    """Reads a unit's row groups (those the plan named, nothing else); keeps the last row group so slices of a
    large one are read once."""

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
