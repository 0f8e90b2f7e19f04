"""Typed views of what a job's output location reports: the manifest (runner.job.finish) and the status
(runner.job.job_status), for callers of the Python API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Record(BaseModel):
    # A key added to the manifest later is kept (as an extra attribute) rather than refused, so an older
    # client reads a newer job's manifest.
    model_config = ConfigDict(extra="allow", frozen=True)


class WorkerStats(_Record):
    """One worker's share of the job (runner.output._rate)."""

    units: int = Field(description="Units it committed.")
    rows: int = Field(description="Rows in those units.")
    completion_tokens: int = Field(description="Tokens it generated.")
    tokens_per_s: float = Field(description="Its tokens over its own busy span (this run's units where it ran any).")
    nodes: list[str] = Field(default_factory=list, description="Ray node ids it ran on.")


class PoolStats(_Record):
    """One pool's share of the job (runner.output._group)."""

    units: int = Field(description="Units its workers committed.")
    rows: int = Field(description="Rows in those units.")
    completion_tokens: int = Field(description="Tokens its workers generated.")
    prompt_tokens_reused: int = Field(0, description="Prompt tokens taken from a shared prefix's KV cache.")
    tokens_per_s: float = Field(description="The sum of its workers' rates.")
    workers: dict[str, WorkerStats] = Field(default_factory=dict, description="By worker identity.")


class RequestCounts(_Record):
    """OpenAI batch jobs: the batch's request counts."""

    total: int
    completed: int
    failed: int


class Totals(_Record):
    """What the committed units add up to (runner.output.summarize); a key is absent there before any unit
    is committed, hence the zeros."""

    rows: int = Field(0, description="Rows in the committed units.")
    rows_ok: int = Field(0, description="Rows with a result.")
    rows_failed: int = Field(0, description="Rows written with an error.")
    units: int = Field(0, description="Committed units counted.")
    prompt_tokens: int = Field(0, description="Prompt tokens over the committed rows.")
    completion_tokens: int = Field(0, description="Generated tokens over the committed rows.")
    prompt_tokens_reused: int = Field(0, description="Prompt tokens taken from a shared prefix's KV cache.")
    errors: dict[str, int] = Field(default_factory=dict, description="Failed rows by error kind.")
    pools: dict[str, PoolStats] = Field(default_factory=dict, description="By pool name.")


class Manifest(Totals):
    """`_manifest.json`: a finished run of the job, succeeded or failed."""

    name: str
    run_id: str = Field(description="This run's id; each unit's marker names the run that committed it.")
    fingerprint: str = Field(description="Hash of what changes the outputs; a resume with another refuses.")
    status: Literal["succeeded", "failed"]
    rows_total: int = Field(description="Rows in the job's input.")
    units_total: int = Field(description="Units in the job's plan.")
    units_committed: int = Field(description="Units committed, by this run and earlier ones.")
    units_skipped: int = Field(description="Units already committed when this run started (resumed).")
    units_this_run: int = Field(description="Units this run committed.")
    wall_time_s: float = Field(description="This run's wall time.")
    rows_per_s: float = Field(description="This run's rows over its wall time.")
    tokens_per_s: float = Field(description="This run's generated tokens over its wall time.")
    events: list[dict[str, Any]] = Field(
        default_factory=list, description="What happened to the cluster during this run, for the report's timeline: "
                                          "each {at, kind, what, run_id}; kinds: node lost, node joined, node "
                                          "draining, worker lost, worker drained, replica start failed, coordinator "
                                          "replaced.")
    files: list[str] = Field(
        default_factory=list, description="The objects that hold the committed rows, relative to output.path: the "
                                          "output files (and, while a job is unfinished, the parts of units waiting "
                                          "for one under `_parts/`).")
    spec: dict[str, Any] | None = Field(None, description="The resolved spec, secrets redacted, as recorded.")
    request_counts: RequestCounts | None = Field(None, description="OpenAI batch jobs only.")


class JobStatus(Totals):
    """What the output location says of a job now (runner.job.job_status)."""

    name: str
    started: bool = Field(description="Whether the output location holds this job.")
    succeeded: bool = Field(description="Whether its last run committed every unit within max_failed_rows.")
    units_total: int | None = Field(description="Units in the job's plan; None before it started.")
    rows_total: int | None = Field(description="Rows in the job's input; None before it started.")
    units_done: int = Field(description="Units committed.")
