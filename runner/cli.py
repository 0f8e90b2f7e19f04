"""The `runner` command: load the spec, call one library function, map errors to exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from runner.errors import RunnerError
from runner.spec import load_spec


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


@main.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
def validate(job_yaml: str) -> None:
    """Check the spec, the inputs, the models and the output location; print the plan. Runs nothing."""
    from runner.job import validate as validate_job

    spec, _ = load_spec(job_yaml)
    plan = validate_job(spec)
    click.echo(f"job {spec.name}: {len(plan.files)} input files, {plan.total_rows} rows, "
               f"{len(plan.units)} units of up to {spec.unit_rows} rows")
    for name, pool in zip(spec.pool_names(), spec.workers):
        click.echo(f"  pool {name}: {pool.replicas} x {pool.engine} {pool.model or ''} "
                   f"(num_cpus={pool.num_cpus:g}, num_gpus={pool.num_gpus:g}, parallel={pool.parallel})")
    click.echo(f"  output: {spec.output.path}")


@main.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
@click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS"),
              help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray).")
@click.option("--overwrite", is_flag=True, help="Replace whatever the output location holds.")
@click.option("--no-dashboard", is_flag=True, help="Start the embedded Ray without its dashboard.")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress lines.")
def submit(job_yaml: str, address: str | None, overwrite: bool, no_dashboard: bool, no_progress: bool) -> None:
    """Run the job (or resume it: committed units are skipped)."""
    from runner.job import RunOptions, run_job

    spec, resolved = load_spec(job_yaml)
    m = run_job(spec, resolved, RunOptions(address or None, overwrite, not no_dashboard, not no_progress))
    click.echo(f"job {spec.name} {m['status']}: {m['rows_ok']} rows ok, {m['rows_failed']} failed "
               f"({m['units_skipped']} units resumed, {m['units_this_run']} generated) in {m['wall_time_s']:.1f}s, "
               f"{m['rows_per_s']:.1f} rows/s, {m['tokens_per_s']:.1f} tok/s -> {spec.output.path}")


@main.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(job_yaml: str, as_json: bool) -> None:
    """Units done / total and rows ok / failed, read from the output location."""
    from runner.job import job_status

    spec, _ = load_spec(job_yaml)
    s = job_status(spec)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    if not s["started"]:
        click.echo(f"job {spec.name}: not started ({spec.output.path} holds no job)")
        return
    state = "succeeded" if s["succeeded"] else "incomplete"
    click.echo(f"job {spec.name}: {state}; units {s['units_done']}/{s['units_total']}, "
               f"rows {s.get('rows', 0)}/{s['rows_total']} ({s.get('rows_ok', 0)} ok, {s.get('rows_failed', 0)} failed)")
    for pool, p in s["pools"].items():
        reused = f", {p['prompt_tokens_reused']} prompt tokens reused" if p.get("prompt_tokens_reused") else ""
        click.echo(f"  pool {pool}: {p['units']} units, {p['rows']} rows, {p['completion_tokens']} tokens, "
                   f"{p['tokens_per_s']} tok/s{reused}")


@main.command("make-tiny-model")
@click.argument("path", type=click.Path(dir_okay=False))
def make_tiny_model(path: str) -> None:
    """Write a tiny random-weight llama GGUF (for tests and trying a job without a real model)."""
    from runner.tinymodel import write_tiny_gguf

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    click.echo(write_tiny_gguf(path))


if __name__ == "__main__":
    main()
