"""The input formats by name: `input.format` picks one, and every caller asks it (runner.inputs.base)."""

from __future__ import annotations

from types import MappingProxyType

from runner.inputs.base import InputFormat
from runner.inputs.jsonl import JsonlFormat
from runner.inputs.openai_batch import OpenAIBatchFormat
from runner.inputs.parquet import ParquetFormat
from runner.spec.job import JobSpec

# The names are the spec's (runner.spec.job.FORMAT_KEYS says which input keys each takes).
FORMATS: MappingProxyType[str, type[InputFormat]] = MappingProxyType({
    "parquet": ParquetFormat,
    "jsonl": JsonlFormat,
    "openai_batch": OpenAIBatchFormat,
})


def input_format(spec: JobSpec) -> InputFormat:
    """The job's input format, bound to the job."""
    return FORMATS[spec.input.format](spec)
