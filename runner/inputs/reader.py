"""Reading a unit's rows from its input file, as the job's input format does it."""

from __future__ import annotations

from runner.inputs.base import UnitReader
from runner.inputs.formats import input_format
from runner.spec.job import JobSpec


def open_reader(spec: JobSpec) -> UnitReader:
    """The reader of the job's input format: its `read(unit, attempt)` gives the unit's rows as engines take
    them (a UnitWork)."""
    return input_format(spec).reader()
