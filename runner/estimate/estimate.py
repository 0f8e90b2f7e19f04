"""`runner plan`: a job's size before it runs (prompt tokens, rows over context, most tokens generated) and,
calibrated on a real sample, its time and cost."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import BaseModel, Field

from runner.errors import SpecError
from runner.estimate.calibrate import Calibration, calibrate_pools, sample_units
from runner.estimate.tokens import open_tokens
from runner.inputs.plan import make_plan
from runner.inputs.rows import row_error
from runner.inputs.units import Plan, Unit, UnitWork
from runner.spec.job import JobSpec
from runner.spec.sampling import Sampling

SAMPLE_ROWS = 2000  # rows tokenized (whole units spread over the job); a job this small is counted exactly.
# A calibration runs them too, and its replica reads more where they cannot fill its engine CALIBRATE_FILLS times.
# After the last unit: the driver sees it, writes the manifest, report and ledger (0.3-0.4 s on the quickstart;
# Ray stops meanwhile, after the job's wall time is taken).
FINISH_S = 0.5


class TokenCount(BaseModel):
    total: int = Field(description="Prompt tokens of all the job's rows (scaled up from the sample if estimated).")
    mean: float = Field(description="Mean prompt tokens per row.")
    max: int = Field(description="Longest prompt, in tokens (of the rows counted).")


class PoolEstimate(BaseModel):
    name: str
    engine: str
    model: str | None
    replicas: int
    cost_per_hour: float | None
    context: int | None = Field(description="Tokens one sequence holds; null: no limit (the echo engine).")
    context_from: str = Field(description="Where `context` comes from.")
    prompt_tokens: TokenCount
    rows_unrenderable: int = Field(description="Chat rows the pool's chat template cannot render (they fail).")
    rows_prompt_over_context: int = Field(description="Rows whose prompt alone does not fit (they fail).")
    rows_output_over_context: int = Field(
        description="Rows whose prompt fits but prompt + max_tokens does not (their text may be cut short).")
    max_generated_tokens: int = Field(description="Most tokens this pool could generate for the whole job: "
                                                  "max_tokens x n per row, less what its context cuts off.")
    calibration: Calibration | None = None


class Eta(BaseModel):
    """The job's expected wall time with the configured replicas, from the calibration."""

    plan_s: float = Field(description="Listing and inspecting the input, checking the models.")
    ray_start_s: float = Field(description="Starting (or joining) Ray; 0 when this process was already connected.")
    replica_start_s: float = Field(description="The slowest pool's replica start (its model load included).")
    rows_per_s: float = Field(description="All replicas of all pools together: sum of replicas x rows/s.")
    generate_s: float = Field(description="The job's rows at that rate.")
    finish_s: float = Field(description="The manifest, report and Ray's stop after the last unit.")
    total_s: float
    cost: float | None = Field(description="Sum of replicas x cost_per_hour x total hours, over the pools that "
                                           "give cost_per_hour; null when none does.")


class Estimate(BaseModel):
    """`runner plan`'s answer; `model_dump(mode="json")` is its --json output."""

    name: str
    task: str
    files: int
    units: int
    rows: int
    exact: bool = Field(description="Every row was tokenized; else counts are scaled up from the sample.")
    rows_sampled: int
    units_sampled: int
    rows_bad: int = Field(description="Rows that fail before any engine (null or empty prompt, bad messages or "
                                      "sampling); left out of every count.")
    max_generated_tokens: int = Field(description="max_tokens x n summed over the rows (each row's own sampling).")
    pools: list[PoolEstimate]
    eta: Eta | None = None


@dataclass
class Sample:
    """The rows read for the estimate: whole units spread over the job; `prompts` and `samplings` hold only
    the rows an engine would see."""

    works: list[UnitWork]
    prompts: list
    samplings: list[Sampling]
    rows: int
    bad: int

    @property
    def count(self) -> int:
        return len(self.prompts)


def estimate(spec: JobSpec, calibrate: bool = False, address: str | None = None,
             download_tokenizer: bool = False) -> Estimate:
    """The job's size from a sample of its rows through each pool's tokenizer (no engine started); with
    `calibrate`, one replica per pool also runs a few units' rows on Ray (at `address`, a GCS address, or
    an embedded Ray) and the answer carries the job's ETA and cost. A vLLM pool's Hugging Face id is read
    from the local Hugging Face cache; `download_tokenizer` fetches its tokenizer and config files there."""
    started = time.time()
    plan = make_plan(spec)
    if calibrate:  # the job's own checks before it starts take its time too (importing vLLM, for one)
        from runner.spec.job import check_models

        check_models(spec)
    plan_s = time.time() - started
    sample = read_sample(spec, plan)
    scale = plan.total_rows / sample.rows if sample.rows else 1.0
    pools = [pool_estimate(spec, i, sample, scale, download_tokenizer) for i in range(len(spec.workers))]
    generated = 0 if spec.task == "embed" else sum(s.max_tokens * s.n for s in sample.samplings)
    est = Estimate(name=spec.name, task=spec.task, files=len(plan.files), units=len(plan.units),
                   rows=plan.total_rows, exact=sample.rows == plan.total_rows, rows_sampled=sample.rows,
                   units_sampled=len(sample.works), rows_bad=round(sample.bad * scale),
                   max_generated_tokens=round(generated * scale), pools=pools)
    if calibrate:
        est = with_calibration(spec, est, sample, plan.units, address, plan_s)
    return est


# -- the sample -----------------------------------------------------------------------------------------


def read_sample(spec: JobSpec, plan: Plan) -> Sample:
    from runner.inputs.reader import open_reader

    reader = open_reader(spec)
    works = [reader.read(unit, 0) for unit in sample_units(plan.units, SAMPLE_ROWS)]
    prompts, samplings, bad = [], [], 0
    for work in works:
        rows = work.rows
        for i, prompt in enumerate(rows.prompts):
            if (rows.bad and i in rows.bad) or row_error(prompt):
                bad += 1
                continue
            prompts.append(prompt)
            samplings.append(rows.samplings[i] if rows.samplings else spec.sampling)
    return Sample(works, prompts, samplings, sum(len(w.rows.prompts) for w in works), bad)


# -- prompt tokens, per pool ----------------------------------------------------------------------------


def pool_estimate(spec: JobSpec, index: int, sample: Sample, scale: float,
                  download_tokenizer: bool = False) -> PoolEstimate:
    """Count the sample's prompt tokens with the pool's own tokenizer; scale counts to the whole job."""
    pool, name = spec.workers[index], spec.pool_names()[index]
    tokens = open_tokens(pool, name, download_tokenizer)
    try:
        counts = [tokens.count(p) for p in sample.prompts]
    finally:
        tokens.close()
    fits = [(c, s) for c, s in zip(counts, sample.samplings, strict=False) if c is not None]
    ctx, generating = tokens.context, spec.task == "generate"
    too_long = [c for c, _ in fits if ctx is not None and c + generating > ctx]
    output_over = [c for c, s in fits if ctx is not None and generating and c < ctx < c + s.max_tokens]
    generated = sum(s.n * min(s.max_tokens, ctx - c if ctx is not None else s.max_tokens)
                    for c, s in fits if ctx is None or c < ctx) if generating else 0
    prompt = [c for c, _ in fits]
    return PoolEstimate(
        name=name, engine=pool.engine, model=getattr(pool, "model", None), replicas=pool.planned_replicas,
        cost_per_hour=pool.cost_per_hour, context=ctx, context_from=tokens.context_from,
        prompt_tokens=TokenCount(total=round(sum(prompt) * scale), mean=round(sum(prompt) / len(prompt), 2)
                                 if prompt else 0.0, max=max(prompt, default=0)),
        rows_unrenderable=round((len(counts) - len(fits)) * scale),
        rows_prompt_over_context=round(len(too_long) * scale),
        rows_output_over_context=round(len(output_over) * scale), max_generated_tokens=round(generated * scale))


# -- calibrated: the ETA -----------------------------------------------------------------------------------


def with_calibration(spec: JobSpec, est: Estimate, sample: Sample, units: tuple[Unit, ...], address: str | None,
                     plan_s: float) -> Estimate:
    """Run the sample (and more of the job's `units`, where an engine holds more) on one replica of each pool,
    one pool after another (so they do not share the CPUs), and add each pool's measures and the job's ETA."""
    from runner.cluster.remote import is_dashboard_address

    if is_dashboard_address(address):
        raise SpecError(f"--address {address}: runner plan --calibrate joins a cluster by its GCS address "
                        "(HEAD:6379), not its dashboard")
    cals, ray_start_s = calibrate_pools(spec, sample.works, units, address)
    pools = [p.model_copy(update={"calibration": c}) for p, c in zip(est.pools, cals, strict=False)]
    return est.model_copy(update={"pools": pools, "eta": job_eta(spec, est.rows, cals, plan_s, ray_start_s)})


def job_eta(spec: JobSpec, rows: int, cals: list[Calibration], plan_s: float, ray_start_s: float) -> Eta:
    """Every pool takes rows from one queue: the job's rate is the sum of replicas x rows/s; its replicas
    start together, so the slowest start counts."""
    rate = sum(p.planned_replicas * c.rows_per_s for p, c in zip(spec.workers, cals, strict=False))
    generate_s = rows / rate if rows and rate else 0.0
    start = max(c.replica_start_s for c in cals)
    total = plan_s + ray_start_s + start + generate_s + FINISH_S
    priced = [p.planned_replicas * p.cost_per_hour for p in spec.workers if p.cost_per_hour is not None]
    return Eta(plan_s=round(plan_s, 3), ray_start_s=ray_start_s, replica_start_s=start, rows_per_s=round(rate, 2),
               generate_s=round(generate_s, 3), finish_s=FINISH_S, total_s=round(total, 3),
               cost=round(sum(priced) * total / 3600, 6) if priced else None)


# -- the table `runner plan` prints ----------------------------------------------------------------------


def render(est: Estimate) -> str:
    """The estimate as a few lines and a table per part: what `runner plan` prints without --json."""
    approx = "" if est.exact else "~"
    how = ("exact (every row tokenized)" if est.exact else
           f"estimated from {est.rows_sampled} of {est.rows} rows ({est.units_sampled} of {est.units} units)")
    lines = [f"job {est.name}: {est.rows} rows in {est.files} files, {est.units} units; counts {how}",
             f"  rows that fail before any engine: {approx}{est.rows_bad}",
             f"  most tokens generated: {approx}{est.max_generated_tokens} (max_tokens x n of each row)", ""]
    head = ["pool", "engine", "context", "prompt tokens", "mean", "max", "prompt > ctx", "+max_tokens > ctx",
            "unrenderable", "max generated"]
    body = [[p.name, p.engine, str(p.context) if p.context else "none", f"{approx}{p.prompt_tokens.total}",
             f"{p.prompt_tokens.mean:.1f}", str(p.prompt_tokens.max), f"{approx}{p.rows_prompt_over_context}",
             f"{approx}{p.rows_output_over_context}", f"{approx}{p.rows_unrenderable}",
             f"{approx}{p.max_generated_tokens}"] for p in est.pools]
    lines += _table(head, body)
    if est.eta is not None:
        lines += ["", "calibrated on one replica per pool:"] + _table(
            ["pool", "replicas", "rows run", "rows/s", "tok/s", "mean generated", "load s", "replica start s"],
            [[p.name, str(p.replicas), str(c.rows), f"{c.rows_per_s:.1f}", f"{c.tokens_per_s:.0f}",
              f"{c.mean_completion_tokens:.1f}", f"{c.model_load_s:.2f}", f"{c.replica_start_s:.2f}"]
             for p in est.pools if (c := p.calibration) is not None])
        lines += ["", _eta_line(est)]
    return "\n".join(lines)


def _eta_line(est: Estimate) -> str:
    e = est.eta
    line = (f"ETA {e.total_s:.1f}s = plan {e.plan_s:.1f}s + Ray start {e.ray_start_s:.1f}s + replica start "
            f"{e.replica_start_s:.1f}s + {est.rows} rows at {e.rows_per_s:.1f} rows/s {e.generate_s:.1f}s + "
            f"finish {e.finish_s:.1f}s")
    if e.cost is not None:
        line += f"; cost {e.cost:.4f} (replicas x cost_per_hour x ETA)"
    return line


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in [head, *body]]
