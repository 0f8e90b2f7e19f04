"""The `runner` command: load the spec, call one library function, map errors to exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from runner.errors import RunnerError, first_line
from runner.spec.job import load_spec, parse_spec_text


def _fail(e: RunnerError) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(e.exit_code)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RunnerError as e:
            _fail(e)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Batch inference over Parquet with llama.cpp and vLLM workers on Ray."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="runner: %(message)s",
                        stream=sys.stderr)
    for noisy in ("ray", "gguf", "filelock", "urllib3", "botocore", "s3fs", "fsspec", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The driver imports vllm only to check engine_args; what it says of this machine's GPU is not the job's.
    logging.getLogger("vllm").setLevel(logging.DEBUG if verbose else logging.ERROR)


@main.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
def validate(job_yaml: str) -> None:
    """Check the spec, the inputs, the models and the output location; print the plan. Runs nothing."""
    from runner.job import validate as validate_job

    spec, _ = load_spec(job_yaml)
    plan = validate_job(spec)
    click.echo(f"job {spec.name}: {len(plan.files)} input files, {plan.total_rows} rows, "
               f"{len(plan.units)} units of up to {spec.unit_rows} rows")
    for i, (name, pool) in enumerate(zip(spec.pool_names(), spec.workers, strict=True)):
        engine = pool.describe()
        placed = "".join(f", {k}={v:g}" for k, v in pool.resources.items())
        placed += f", accelerator_type={pool.accelerator_type}" if pool.accelerator_type else ""
        most = f" (at most {pool.max_replicas})" if pool.max_replicas else ""
        click.echo(f"  pool {name}: {pool.replicas}{most} x {pool.engine} {getattr(pool, 'model', '')} "
                   f"(num_cpus={pool.num_cpus:g}, num_gpus={pool.num_gpus:g}{placed}, {engine}; "
                   f"{spec.units_per_lease(i) * spec.unit_rows} rows a lease)")
    click.echo(f"  output: {spec.output.path}")


ADDRESS_HELP = ("Ray cluster: its dashboard (http://HEAD:8265) submits through the Job Submission API, "
                "a GCS address (HEAD:6379) joins it from here. Default: RAY_ADDRESS, else an embedded local Ray.")


def _address_option(f):
    return click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS") or None, help=ADDRESS_HELP)(f)


@main.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
@click.option("--calibrate", is_flag=True, help="Also run a small sample on one replica of each pool (on Ray, "
                                                "written nowhere) for rates, the ETA and the cost.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS") or None,
              help="--calibrate on this Ray cluster's GCS address (HEAD:6379). Default: RAY_ADDRESS, else an "
                   "embedded local Ray.")
@click.option("--download-tokenizer", is_flag=True,
              help="A vLLM pool whose model is a Hugging Face id and not in the local Hugging Face cache: fetch "
                   "its tokenizer and config files into that cache (never weights). Without it, runner plan asks "
                   "no hub for anything.")
def plan(job_yaml: str, calibrate: bool, as_json: bool, address: str | None, download_tokenizer: bool) -> None:
    """Before spending: prompt tokens per pool, rows over context, most tokens generated; with --calibrate,
    rates per replica, the ETA and the cost. Starts no engine without --calibrate."""
    from runner.estimate.estimate import estimate, render

    spec, _ = load_spec(job_yaml)
    est = estimate(spec, calibrate=calibrate, address=address, download_tokenizer=download_tokenizer)
    click.echo(json.dumps(est.model_dump(mode="json"), indent=2) if as_json else render(est))


@main.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False), required=False)
@_address_option
@click.option("--overwrite", is_flag=True, help="Replace whatever the output location holds.")
@click.option("--no-wait", is_flag=True, help="With a dashboard --address: print the submission id and return.")
@click.option("--no-dashboard", is_flag=True, help="Start the embedded Ray without its dashboard.")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress lines.")
@click.option("--spec-from-env", hidden=True, help="Read the job.yaml text from this environment variable.")
def submit(job_yaml: str | None, address: str | None, overwrite: bool, no_wait: bool, no_dashboard: bool,
           no_progress: bool, spec_from_env: str | None) -> None:
    """Run the job (or resume it: committed units are skipped), here or on a Ray cluster."""
    from runner.cluster.ray import RunOptions
    from runner.cluster.remote import is_dashboard_address
    from runner.job import run_job

    if bool(job_yaml) == bool(spec_from_env):
        raise click.UsageError("give JOB_YAML")
    if spec_from_env:
        spec, resolved = parse_spec_text(os.environ.get(spec_from_env, ""), f"${{{spec_from_env}}}")
    else:
        spec, resolved = load_spec(job_yaml)
    if is_dashboard_address(address):
        _submit_remote(job_yaml, spec, address, overwrite, no_wait)
        return
    m = run_job(spec, resolved, RunOptions(address, overwrite, not no_dashboard, not no_progress))
    rate = "" if spec.task == "embed" else f", {m['tokens_per_s']:.1f} tok/s"  # an embedding job generates no tokens
    click.echo(f"job {spec.name} {m['status']}: {m['rows_ok']} rows ok, {m['rows_failed']} failed "
               f"({m['units_skipped']} units resumed, {m['units_this_run']} run) in {m['wall_time_s']:.1f}s, "
               f"{m['rows_per_s']:.1f} rows/s{rate} -> {spec.output.path}")


def _submit_remote(job_yaml: str, spec, address: str, overwrite: bool, no_wait: bool) -> None:
    from runner.cluster.remote import RemoteJobs, exit_code

    jobs = RemoteJobs(address)
    sid = jobs.submit(spec, Path(job_yaml).read_text(), dict(os.environ), overwrite)
    click.echo(f"submitted job {spec.name} to {address} as {sid}; dashboard: {address.rstrip('/')}/#/jobs/{sid}")
    if no_wait:
        click.echo(f"follow it with: runner logs {sid} --address {address} --follow")
        return
    try:
        info = jobs.follow(sid, lambda t: click.echo(t, nl=False))
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job runs on. runner stop {sid} --address {address} ends it", err=True)
        sys.exit(130)
    message = first_line(info.message)
    click.echo(f"submission {sid}: {info.status.value}" + (f" ({message})" if message else ""))
    sys.exit(exit_code(info))


@main.command()
@click.argument("target")
@_address_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(target: str, address: str | None, as_json: bool) -> None:
    """A job's progress: TARGET is a job.yaml (read from its output location) or a submission id (--address)."""
    if not os.path.isfile(target):
        _remote_status(target, _dashboard(address, f"{target}: no such job.yaml"), as_json)
        return
    from runner.job import job_status

    spec, _ = load_spec(target)
    s = job_status(spec)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    if not s["started"]:
        click.echo(f"job {spec.name}: not started ({spec.output.path} holds no job)")
        return
    state = "succeeded" if s["succeeded"] else "incomplete"
    click.echo(f"job {spec.name}: {state}; units {s['units_done']}/{s['units_total']}, "
               f"rows {s.get('rows', 0)}/{s['rows_total']} "
               f"({s.get('rows_ok', 0)} ok, {s.get('rows_failed', 0)} failed)")
    for pool, p in s["pools"].items():
        reused = f", {p['prompt_tokens_reused']} prompt tokens reused" if p.get("prompt_tokens_reused") else ""
        click.echo(f"  pool {pool}: {p['units']} units, {p['rows']} rows, {p['completion_tokens']} tokens, "
                   f"{p['tokens_per_s']} tok/s{reused}")
        for worker, w in p["workers"].items():
            click.echo(f"    {worker}: {w['units']} units, {w['rows']} rows, {w['completion_tokens']} tokens, "
                       f"{w['tokens_per_s']} tok/s")


def _dashboard(address: str | None, problem: str) -> str:
    """The cluster's dashboard address, or a one-line error saying `problem` and how to give it."""
    from runner.cluster.remote import is_dashboard_address
    from runner.errors import SpecError

    if not is_dashboard_address(address):
        raise SpecError(f"{problem}; give --address http://HEAD:8265 (or RAY_ADDRESS) for a submission id")
    return address


def _remote_status(sid: str, address: str, as_json: bool) -> None:
    from runner.cluster.remote import RemoteJobs

    info = RemoteJobs(address).info(sid)
    if as_json:
        click.echo(info.model_dump_json(indent=2) if hasattr(info, "model_dump_json") else json.dumps(vars(info)))
        return
    name = (info.metadata or {}).get("job_name", "?")
    message = first_line(info.message)
    click.echo(f"submission {sid} (job {name}): {info.status.value}" + (f": {message}" if message else ""))


@main.command()
@click.argument("submission_id")
@_address_option
@click.option("--follow", is_flag=True, help="Keep printing until the job ends.")
def logs(submission_id: str, address: str | None, follow: bool) -> None:
    """Print a submitted job's log (driver output, worker lines included)."""
    from runner.cluster.remote import RemoteJobs

    jobs = RemoteJobs(_dashboard(address, f"{submission_id}: no Ray cluster to ask"))
    if follow:
        jobs.follow(submission_id, lambda t: click.echo(t, nl=False))
    else:
        click.echo(jobs.logs(submission_id), nl=False)


@main.command()
@click.argument("submission_id")
@_address_option
def stop(submission_id: str, address: str | None) -> None:
    """Stop a submitted job; its committed units stay, and submitting it again resumes."""
    from runner.cluster.remote import RemoteJobs

    stopped = RemoteJobs(_dashboard(address, f"{submission_id}: no Ray cluster to ask")).stop(submission_id)
    click.echo(f"submission {submission_id}: " + ("stop requested" if stopped else "was not running"))


@main.command()
@click.argument("target")
def report(target: str) -> None:
    """Write _report.html into a job's output location: TARGET is its job.yaml or the OUTPUT_PATH URL
    (credentials from the environment, as fsspec finds them)."""
    from runner.output.report import write_report

    click.echo(write_report(_output_location(target)))


@main.command()
@click.argument("target")
@click.option("--format", "fmt", type=click.Choice(["openai-batch"]), default="openai-batch", show_default=True,
              help="openai-batch: the OpenAI Batch API's output.jsonl and errors.jsonl, and its batch.json.")
@click.option("--to", "dest", required=True, help="Directory (any fsspec URL) that receives the files.")
def export(target: str, fmt: str, dest: str) -> None:
    """Write a job's committed rows in another format: TARGET is its job.yaml or the OUTPUT_PATH URL."""
    from runner.output.export import BATCH, ERRORS, OUTPUT, export_openai_batch
    from runner.storage.location import Location

    done = export_openai_batch(_output_location(target), Location.open(dest))
    state = "" if done.job_succeeded else " (the job has not finished: only its committed rows)"
    click.echo(f"exported {done.total} requests{state}: {done.completed} completed -> {done.dest}/{OUTPUT}, "
               f"{done.failed} failed -> {done.dest}/{ERRORS}; batch object {done.dest}/{BATCH}")


def _output_location(target: str):
    """A job's output location: from its job.yaml, or TARGET is the location's URL."""
    from runner.api import output_location

    return output_location(target)


@main.command("make-tiny-model")
@click.argument("path", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["gguf", "hf"]),
              help="gguf (llama.cpp) or hf (a Hugging Face directory, for vLLM); default: gguf when PATH ends in "
                   ".gguf, else hf.")
@click.option("--quant", type=click.Choice(["Q8_0", "BF16", "F32", "F16", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K",
                                           "IQ4_XS"]), default="Q8_0", show_default=True,
              help="How a GGUF stores the weights; BF16 and F32 hold exactly the Hugging Face directory's. F16, "
                   "Q4_0 and the K- and I-quants are made by llama.cpp's own quantizer, on a 256-wide model.")
def make_tiny_model(path: str, fmt: str | None, quant: str) -> None:
    """Write the tiny random-weight llama (the same weights in either format) for tests and trying a job
    without a real model."""
    from runner.tinymodel import WRITTEN, TinyConfig, write_tiny_model

    config = TinyConfig(quant=quant) if quant in WRITTEN else TinyConfig.wide(quant=quant)
    click.echo(write_tiny_model(path, config, fmt))


if __name__ == "__main__":
    main()
