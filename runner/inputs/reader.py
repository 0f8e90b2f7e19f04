"""Reading a unit's rows from its input file: the row groups the plan named, nothing else."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from runner.errors import InputError
from runner.inputs.rows import read_rows
from runner.inputs.units import Unit, UnitWork
from runner.spec.job import JobSpec
from runner.storage.location import retrying


def open_reader(spec: JobSpec):
    """The reader of the job's input format: its `read(unit, attempt)` gives the unit's rows as engines take
    them (a UnitWork)."""
    if spec.input.format == "openai_batch":
        from runner.inputs.openai_batch import BatchFileReader

        return BatchFileReader(spec)
    return RowGroupReader(spec)


class RowGroupReader:
    """Reads a unit's row groups; keeps the last row group so slices of a large one are read once."""

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
