"""The Python API: submit, status, plan and read a job from a pipeline task or a notebook, with typed
results and the same typed errors the CLI maps to exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as ds

from runner.cluster.ray import RunOptions
from runner.errors import (
    ClusterError,
    EngineError,
    InputError,
    JobConflictError,
    JobFailedError,
    ModelError,
    RunnerError,
    SpecError,
    StorageError,
    first_line,
)
from runner.job import job_status, run_job
from runner.output.ledger import Ledger
from runner.output.manifest import JobStatus, Manifest
from runner.output.store import OutputStore
from runner.spec.job import JobSpec, load_spec, parse_spec, redact
from runner.storage.location import Location, absolute_local, storage_errors
from runner.storage.names import JOB, MANIFEST

if TYPE_CHECKING:
    from runner.estimate.estimate import Estimate  # written alongside; imported where plan runs

log = logging.getLogger(__name__)

JobLike = str | os.PathLike | Mapping[str, Any] | JobSpec  # a job.yaml path, its keys as a dict, or a spec
JOB_SUFFIXES = (".yaml", ".yml")
# The exit code a remote `runner submit` ended with, back to the error it raised there.
_BY_EXIT_CODE = {c.exit_code: c for c in (SpecError, InputError, ModelError, StorageError, JobConflictError,
                                          JobFailedError, EngineError, ClusterError)}


def load_job(job: JobLike) -> tuple[JobSpec, dict]:
    """The validated spec and its redacted form, as `runner submit` records it. A dict goes through the
    YAML path (${VAR} from the environment, one-line SpecErrors); a JobSpec is already resolved, so only
    its secret-looking keys are redacted."""
    if isinstance(job, JobSpec):
        dumped = job.model_dump(mode="json")
        return job, redact(dumped, dumped, set())
    if isinstance(job, Mapping):
        return parse_spec(dict(job), dict(os.environ), source="job dict")
    if isinstance(job, (str, os.PathLike)):
        return load_spec(job)
    raise SpecError(f"job: expected a job.yaml path, a dict or a JobSpec, got {type(job).__name__}")


def submit(job: JobLike, *, address: str | None = None, overwrite: bool = False, progress: bool = False,
           dashboard: bool = True) -> Manifest:
    """Run the job, or resume it (committed units are skipped), and return its manifest.

    `address` as `runner submit --address`: None takes RAY_ADDRESS, else an embedded local Ray (or the Ray
    this process is already connected to); a GCS address (HEAD:6379) joins that cluster; a dashboard
    (http://HEAD:8265) submits through the Job Submission API, waits for the job, and reads the manifest
    from the output location. Raises the RunnerError subclass the CLI would exit with (JobFailedError when
    the job ran but did not complete; its manifest is then on storage with status "failed")."""
    from runner.cluster.remote import is_dashboard_address

    spec, resolved = load_job(job)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if is_dashboard_address(address):
        return _submit_remote(job, spec, address, overwrite, progress)
    return Manifest.model_validate(run_job(spec, resolved, RunOptions(address, overwrite, dashboard, progress)))


def _submit_remote(job: JobLike, spec: JobSpec, address: str, overwrite: bool, progress: bool) -> Manifest:
    from runner.cluster.remote import RemoteJobs

    jobs = RemoteJobs(address)
    sid = jobs.submit(spec, spec_text(job, spec), dict(os.environ), overwrite)
    log.info("submitted job %s to %s as %s", spec.name, address, sid)
    info = jobs.follow(sid, sys.stderr.write if progress else (lambda _: None))
    if str(info.status) != "SUCCEEDED":
        raise remote_error(info, jobs.logs(sid), sid)
    return read_manifest(OutputStore(spec).loc)


def spec_text(job: JobLike, spec: JobSpec) -> str:
    """The job as YAML text for the cluster's `runner submit --spec-from-env`. A file or a dict keeps its
    ${VAR} references, so secrets travel as variables (RemoteJobs.submit); JSON is YAML."""
    if isinstance(job, (str, os.PathLike)):
        return Path(job).read_text()
    if isinstance(job, Mapping):
        return json.dumps(dict(job), default=str)
    dumped = spec.model_dump(mode="json")
    if redact(dumped, dumped, set()) != dumped:  # a resolved secret would show in the job's runtime env
        raise SpecError(f"job {spec.name}: a JobSpec holds resolved secrets; submit its job.yaml path or a dict "
                        "with ${VAR} references to a dashboard address")
    return json.dumps(dumped)


def remote_error(info, log_text: str, submission_id: str) -> RunnerError:
    """The error a remote run ended with: the class its exit code stands for, the message its last
    `error:` line gave (else Ray's own); a run that ended otherwise (stopped, crashed) is a ClusterError."""
    from runner.cluster.remote import exit_code

    said = [line.removeprefix("error: ") for line in log_text.splitlines() if line.startswith("error: ")]
    message = said[-1] if said else first_line(info.message) or "no message"
    return _BY_EXIT_CODE.get(exit_code(info), ClusterError)(
        f"submission {submission_id} {str(info.status).lower()}: {message}")


def read_manifest(loc: Location) -> Manifest:
    """The manifest the last run of the job at `loc` wrote."""
    with storage_errors(f"{loc.url_of(MANIFEST)}: cannot read the manifest"):
        return Manifest.model_validate(loc.read_json(MANIFEST))


def status(job: JobLike) -> JobStatus:
    """What the job's output location says now: started, succeeded, units and rows done."""
    spec, _ = load_job(job)
    return JobStatus.model_validate(job_status(spec))


def plan(job: JobLike, *, calibrate: bool = False, address: str | None = None,
         download_tokenizer: bool = False) -> Estimate:
    """The job's estimate, as `runner plan` prints it (runner.estimate.estimate): rows, prompt tokens per pool,
    rows over a pool's context, the most tokens it can generate; with `calibrate`, measured speed, ETA and
    cost. A vLLM pool whose model is a Hugging Face id reads its tokenizer from the local Hugging Face cache;
    `download_tokenizer` fetches only its tokenizer and config files (never weights) when they are not there."""
    from runner.estimate.estimate import estimate  # the estimator loads only when asked for

    spec, _ = load_job(job)
    return estimate(spec, calibrate=calibrate, address=address, download_tokenizer=download_tokenizer)


def read(job_or_output: JobLike, *, storage_options: dict[str, Any] | None = None) -> ds.Dataset:
    """The committed rows of a job as a pyarrow Dataset: the output files and the waiting parts of the units
    the ledger counts committed, in unit
    order, read through the location's fsspec filesystem (so s3:// and the rest too). `job_or_output`: a job
    (a .yaml/.yml path, a dict, a JobSpec) or its output location's URL, with `storage_options` for it."""
    loc = output_location(job_or_output, storage_options)
    with storage_errors(f"{loc.url}: cannot read the outputs"):
        if not loc.exists(JOB):
            raise StorageError(f"{loc.url}: holds no runner job (no {JOB})")
    with storage_errors(f"{loc.url}: cannot read the ledger"):
        paths = [loc.path(name) for name in dict.fromkeys(s.data_name for s in Ledger.load(loc).stats)]
    with storage_errors(f"{loc.url}: cannot open the committed parts"):
        return ds.dataset(paths, format="parquet", filesystem=loc.fs)


def output_location(job_or_output: JobLike, storage_options: dict[str, Any] | None = None) -> Location:
    """A job's output location, or the location an output URL names."""
    is_url = isinstance(job_or_output, (str, os.PathLike)) and not str(job_or_output).endswith(JOB_SUFFIXES)
    if is_url:
        return Location.open(absolute_local(str(job_or_output)), storage_options)
    if storage_options is not None:
        raise SpecError("storage_options: given with a job, whose output.storage_options are used; give them "
                        "with an output URL only")
    return OutputStore(load_job(job_or_output)[0]).loc
