"""Planning: list the input shards, read only their Parquet footers, cut units of work."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from runner.inputs.listing import list_inputs
from runner.inputs.parquet import _check_same_types, cut_units, inspect_file
from runner.inputs.units import Plan
from runner.spec.job import JobSpec


def make_plan(spec: JobSpec) -> Plan:
    """List and inspect the input; raises InputError naming the file or column at fault."""
    if spec.input.format == "openai_batch":
        from runner.inputs.openai_batch import plan_batch_files

        return plan_batch_files(spec)
    listed = list_inputs(spec.input.path, spec.input.storage_options)
    with ThreadPoolExecutor(max_workers=min(16, len(listed))) as pool:
        inspected = list(pool.map(lambda item: inspect_file(spec, *item), listed))
    _check_same_types(spec, inspected)
    files = [f for f, _ in inspected]
    units = [u for i, f in enumerate(files) for u in cut_units(i, f, spec.unit_rows)]
    return Plan(tuple(files), tuple(units))


