"""Parquet inputs: footers, column checks, and units cut along row groups."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from runner.errors import InputError
from runner.inputs.listing import _footer, reading, size_and_version
from runner.inputs.units import InputFile, Unit, new_unit
from runner.spec.job import JobSpec


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
