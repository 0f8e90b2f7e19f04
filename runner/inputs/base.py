"""The input format interface: what every format (Parquet, JSONL, OpenAI batch files) answers for a job."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from runner.inputs.units import Plan, Unit, UnitWork
from runner.spec.job import JobSpec
from runner.storage.location import Location


class UnitReader(Protocol):
    """Reads one unit's rows as engines take them; a worker keeps one for the units it is given."""

    def read(self, unit: Unit, attempt: int) -> UnitWork: ...


class InputFormat(ABC):
    """One input format, bound to a job: it plans its files into units, reads a unit's rows, and says what every
    output row carries of its input. Registered by name in runner.inputs.formats; callers ask it, and never
    branch on the format's name. The defaults are a table's: rows from the columns the job names."""

    suffix = ".parquet"  # the files a directory stands for

    def __init__(self, spec: JobSpec):
        self.spec = spec

    @abstractmethod
    def plan(self) -> Plan:
        """List and inspect the input, cut units; raises InputError naming the file or column at fault."""

    @abstractmethod
    def reader(self) -> UnitReader:
        """A reader of this job's units."""

    @property
    def copied_columns(self) -> list[str]:
        """The input columns every output row carries (after source_file and source_row), to join results back."""
        inp = self.spec.input
        return list(dict.fromkeys(([inp.id_column] if inp.id_column else []) + list(inp.columns)))

    @property
    def id_column(self) -> str | None:
        """The copied column that names each row (an OpenAI batch export's custom_id); None: file and row do."""
        return self.spec.input.id_column

    @property
    def endpoint_column(self) -> str | None:
        """The copied column holding each row's OpenAI endpoint url; None: the job's task says it."""
        return None

    @property
    def per_row_sampling(self) -> bool:
        """Whether rows may carry their own sampling (so outputs keep room for logprobs and choices)."""
        return self.spec.input.sampling_column is not None

    @property
    def request_counts(self) -> bool:
        """Whether the manifest counts the rows as the OpenAI Batch API counts its requests."""
        return False

    def keep(self, loc: Location, plan: Plan) -> None:
        """Keep in the job's output location what planning learned of the files that a resume can plan from
        without reading them again; nothing, for a format that reads only small footers."""
        return None
