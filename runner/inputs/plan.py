"""Planning: the job's input listed, inspected and cut into units, as its format does it."""

from __future__ import annotations

from runner.inputs.formats import input_format
from runner.inputs.units import Plan
from runner.spec.job import JobSpec


def make_plan(spec: JobSpec) -> Plan:
    """List and inspect the input; raises InputError naming the file or column at fault."""
    return input_format(spec).plan()
