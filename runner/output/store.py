"""The output location: unit parts, commit markers (written last), the job record and the manifest."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from runner.engines.base import Completion
from runner.errors import EngineError, FencedError, JobConflictError
from runner.inputs.formats import input_format
from runner.inputs.units import Plan, Unit, part_name
from runner.spec.job import JobSpec
from runner.storage.location import Location, storage_errors
from runner.storage.names import COMMITS, JOB, LOCK, MANIFEST, STAGED, SUCCESS


@dataclass(slots=True)  # a driver holds one per committed unit: 100,000s of them
class UnitStats:
    """What a commit marker records about one unit; the manifest and `runner status` add these up."""

    unit_id: str
    rows: int
    rows_ok: int
    rows_failed: int
    prompt_tokens: int
    completion_tokens: int
    pool: str
    worker: str
    run_id: str
    attempt: int = 1
    started_at: float = 0.0
    finished_at: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    prompt_tokens_reused: int = 0  # taken from a shared prefix's KV instead of computed
    node: str = ""  # the Ray node id the worker ran on
    embedding_dim: int = 0  # task embed: the width of the unit's vectors
    file: str = ""  # the output file that holds its rows; "" while they wait under `_parts/`
    part_bytes: int = 0  # the size of the Parquet object it was committed as (0 in markers older than this)

    @property
    def data_name(self) -> str:
        """The object that holds the unit's rows now."""
        return self.file or (staged_name(self.unit_id) if self.part_bytes else part_name(self.unit_id))


def staged_name(unit_id: str) -> str:
    """Where a committed unit's rows wait for an output file: no `*.parquet` glob, and no reader of a
    directory (pyarrow, DuckDB, polars, Spark: `_` prefixes), picks it up."""
    return f"{STAGED}/{unit_id}.part"


def error_kind(error: str) -> str:
    return error.split(":", 1)[0].strip()[:60]


def output_table(spec: JobSpec, unit: Unit, inputs: pa.Table, results: list[Completion | None],
                 embedding_dim: int = 0) -> pa.Table:
    """One output row per input row, in input order; refuses a unit whose rows do not match one to one.
    Which columns a part has depends on the job spec only, so every part of a job has one schema."""
    if len(results) != unit.num_rows or inputs.num_rows != unit.num_rows or any(r is None for r in results):
        missing = sum(r is None for r in results)
        raise EngineError(f"{unit.id}: {len(results) - missing} results for {unit.num_rows} input rows")
    cols: dict[str, pa.Array] = {
        "source_file": pa.array([unit.source_file] * unit.num_rows, pa.string()),
        "source_row": pa.array(np.arange(unit.row_start, unit.row_start + unit.num_rows, dtype=np.int64)),
    }
    for name in input_format(spec).copied_columns:
        if name not in cols:
            cols[name] = inputs.column(name)
    if spec.task == "embed":
        cols["embedding"] = embedding_column([r.embedding for r in results], embedding_dim)
        cols["prompt_tokens"] = pa.array([r.prompt_tokens for r in results], pa.int64())
        cols["error"] = pa.array([r.error for r in results], pa.string())
        return pa.table(cols)
    cols["text"] = pa.array([r.text for r in results], pa.string())
    cols["finish_reason"] = pa.array([r.finish_reason for r in results], pa.string())
    cols["prompt_tokens"] = pa.array([r.prompt_tokens for r in results], pa.int64())
    cols["completion_tokens"] = pa.array([r.completion_tokens for r in results], pa.int64())
    cols["error"] = pa.array([r.error for r in results], pa.string())
    cols.update(extra_columns(spec, results))
    return pa.table(cols)


LOGPROB = pa.struct([("token", pa.string()), ("logprob", pa.float32())])
LOGPROBS = pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float32()),
                               ("top_logprobs", pa.list_(LOGPROB))]))
CHOICES = pa.list_(pa.struct([("text", pa.string()), ("finish_reason", pa.string()),
                              ("completion_tokens", pa.int64())]))


def extra_columns(spec: JobSpec, results: list[Completion]) -> dict[str, pa.Array]:
    """`parsed` when the job's sampling has a JSON schema; `logprobs` and `choices` when the job's sampling
    asks for them, or when rows may ask (the input format's per_row_sampling): then null where a row did not."""
    s, per_row = spec.sampling, input_format(spec).per_row_sampling
    cols: dict[str, pa.Array] = {}
    if s.response_format is not None and s.response_format.json_schema is not None:
        from runner.spec.schema import arrow_type, parsed_column

        cols["parsed"] = parsed_column([r.parsed for r in results], arrow_type(s.json_schema))
    if s.logprobs or per_row:
        cols["logprobs"] = pa.array([None if r.logprobs is None else [
            {"token": t.token, "logprob": t.logprob, "top_logprobs": [{"token": a, "logprob": b} for a, b in t.top]}
            for t in r.logprobs] for r in results], LOGPROBS)
    if s.n > 1 or per_row:
        cols["choices"] = pa.array([None if r.choices is None else [
            {"text": c.text, "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens}
            for c in r.choices] for r in results], CHOICES)
    return cols


def embedding_column(vectors: list, dim: int) -> pa.Array:
    """Fixed-size lists of float32, `dim` wide (null for a failed row), built from one flat buffer."""
    import numpy as np

    valid = [v is not None for v in vectors]
    flat = np.zeros((len(vectors), dim), np.float32)
    for i, v in enumerate(vectors):
        if v is not None:
            if len(v) != dim:
                raise EngineError(f"an embedding of width {len(v)} in a job of width {dim}")
            flat[i] = v
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), dim,
                                             mask=pa.array([not x for x in valid]))


def unit_stats(unit: Unit, results: list[Completion], **who) -> UnitStats:
    errors = Counter(error_kind(r.error) for r in results if r.error)
    failed = sum(errors.values())
    return UnitStats(
        unit_id=unit.id, rows=unit.num_rows, rows_ok=unit.num_rows - failed, rows_failed=failed,
        prompt_tokens=sum(r.prompt_tokens for r in results),
        # every choice's tokens were generated, not only the first's
        completion_tokens=sum(sum(c.completion_tokens for c in r.choices) if r.choices else r.completion_tokens
                              for r in results), errors=dict(errors),
        prompt_tokens_reused=sum(r.cached_tokens for r in results), **who,
    )


class OutputStore:
    """Owns every object under output.path."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.loc = Location.open(spec.output.path, spec.output.storage_options)

    def check_writable(self) -> None:
        probe = f"_probe-{uuid.uuid4().hex}"
        with storage_errors(f"output.path: {self.loc.url} is not writable"):
            self.loc.write_bytes(probe, b"")
            self.loc.fs.rm_file(self.loc.path(probe))

    def begin(self, plan: Plan, resolved_spec: dict, overwrite: bool) -> bool:
        """Claim the location for this job; returns True when it resumes an earlier run."""
        with storage_errors(f"output.path: {self.loc.url}"):
            if overwrite:
                self.loc.remove_all(keep=(LOCK,))  # the lock is this driver's own
            earlier = self.job_record()  # not a listing: a resumed job's location holds every part
            resuming = earlier is not None
            if resuming:
                self._check_same_job(earlier, plan)
            elif any(not n.startswith(("_", ".")) for n in self.loc.list()):
                raise JobConflictError(
                    f"output.path: {self.loc.url} holds files but no runner job; use --overwrite to replace them"
                )
            record = {"name": self.spec.name, "fingerprint": self.spec.fingerprint(),
                      "input_fingerprint": plan.fingerprint(), "inputs": [f.identity() for f in plan.files],
                      "units": len(plan.units), "rows": plan.total_rows, "spec": resolved_spec}
            self.loc.write_json(JOB, record)
            if self.loc.exists(SUCCESS):
                self.loc.fs.rm_file(self.loc.path(SUCCESS))
        return resuming

    def _check_same_job(self, record: dict, plan: Plan) -> None:
        if record.get("fingerprint") != self.spec.fingerprint():
            raise JobConflictError(
                f"output.path: {self.loc.url} holds job {record.get('name')!r} with a different spec "
                "(model, sampling, input or unit_rows); use --overwrite to replace it"
            )
        if "inputs" not in record:  # written before the record kept each file's identity: urls and rows only
            if record.get("input_fingerprint") != plan.rows_fingerprint():
                raise JobConflictError(
                    f"output.path: {self.loc.url} holds this job over different input files or row counts; "
                    "use --overwrite to start over"
                )
            return
        # Same identities, so every unit id names the rows it named before (see Plan.input_change).
        change = plan.input_change(record["inputs"])
        if change:
            raise JobConflictError(
                f"output.path: {self.loc.url} holds this job over other input: {change}; use --overwrite to start over"
            )

    def commit(self, unit: Unit, table: pa.Table, stats: UnitStats, fence: str | None = None) -> None:
        """Data object first, marker last: a unit is committed exactly when its marker exists. With
        output.target_file_mb the data waits under `_parts/` for an output file (runner.output.files), else
        it is the unit's own file. `fence`: the run whose driver must hold the job lock; FencedError, and
        nothing written, when another run holds it."""
        grouped = self.spec.output.target_file_mb > 0
        name = staged_name(unit.id) if grouped else unit.data_name
        with storage_errors(f"{self.loc.url_of(name)}: cannot commit unit"):
            if fence is not None:
                self.check_fence(fence, unit.id)
            stats.part_bytes = self.loc.write_table(name, table)
            stats.file = "" if grouped else name
            self.loc.write_json(f"{COMMITS}/{unit.id}.json", asdict(stats))

    def check_fence(self, run_id: str, unit_id: str) -> None:
        check_fence(self.loc, run_id, f"{unit_id} is not committed by it")

    def commit_results(self, unit: Unit, inputs: pa.Table, results: list[Completion | None],
                       embedding_dim: int = 0, **who) -> UnitStats:
        """The one commit path, for a worker's unit and for the driver's given-up one: one output row per
        input row, its stats, then `commit`, fenced by the job lock for `who`'s run_id. `who`: pool, worker,
        run_id, attempt, times, node."""
        table = output_table(self.spec, unit, inputs, results, embedding_dim)
        stats = unit_stats(unit, results, embedding_dim=embedding_dim, **who)
        self.commit(unit, table, stats, fence=who.get("run_id"))
        return stats

    def job_record(self) -> dict | None:
        with storage_errors(f"output.path: {self.loc.url}"):
            return self.loc.read_json(JOB) if self.loc.exists(JOB) else None

    def finish(self, manifest: dict, succeeded: bool) -> None:
        with storage_errors(f"output.path: {self.loc.url}: cannot write the manifest"):
            self.loc.write_json(MANIFEST, manifest)
            if succeeded:
                self.loc.write_bytes(SUCCESS, b"")

    def succeeded(self) -> bool:
        return self.loc.exists(SUCCESS)


def check_fence(loc: Location, run_id: str, what: str) -> None:
    """Raise FencedError when the job lock names another run than `run_id` (one read of the lock): a driver
    whose lock was taken over lets none of its workers commit once the new driver holds it."""
    try:
        holder = loc.read_json(LOCK).get("run_id")
    except FileNotFoundError:  # released, or a run without a lock (a test driving Ray itself)
        return
    except ValueError:  # being written this moment by the lock's own rename: the holder is being renewed
        return
    if holder != run_id:
        raise FencedError(f"output.path: {loc.url}: run {holder} holds the job lock now, not run {run_id}; {what}")


def list_markers(loc: Location) -> dict[str, str]:
    """{unit id: marker name} of every commit marker under `loc`, in unit id order, from one listing;
    a local write still in flight (a hidden temporary name) is not a marker."""
    with storage_errors(f"output.path: {loc.url}: cannot list commit markers"):
        names = loc.list(COMMITS)
    return {n.rsplit("/", 1)[-1].removesuffix(".json"): n for n in names if n.endswith(".json")}


def read_markers(loc: Location, names: list[str] | None = None) -> list[UnitStats | None]:
    """The commit markers `names` (default: every one under `loc`), read in parallel, in the order given;
    None for one gone since it was listed (folded into the ledger)."""
    names = list(list_markers(loc).values()) if names is None else names

    def read(name: str) -> UnitStats | None:
        try:
            return UnitStats(**loc.read_json(name))
        except FileNotFoundError:
            return None

    with storage_errors(f"output.path: {loc.url}: cannot read commit markers"), \
            ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, names))


def summarize(markers: list[UnitStats], pools: list[str], run_id: str | None = None) -> dict:
    """Totals, per pool and per worker; tokens/s over each worker's own busy span."""
    tot = Counter()
    errors: Counter = Counter()
    by_pool: dict[str, list[UnitStats]] = defaultdict(list)
    for m in markers:
        tot.update(rows=m.rows, rows_ok=m.rows_ok, rows_failed=m.rows_failed, units=1,
                   prompt_tokens=m.prompt_tokens, completion_tokens=m.completion_tokens,
                   prompt_tokens_reused=m.prompt_tokens_reused)
        errors.update(m.errors)
        by_pool[m.pool].append(m)
    out = dict(tot)
    out["errors"] = dict(errors)
    out["pools"] = {p: _group(ms, run_id) for p, ms in sorted(by_pool.items())}
    for p in pools:
        out["pools"].setdefault(p, _group([], run_id))
    return out


def _group(ms: list[UnitStats], run_id: str | None) -> dict:
    workers: dict[str, list[UnitStats]] = defaultdict(list)
    for m in ms:
        workers[m.worker].append(m)
    rates = {w: _rate(wm, run_id) for w, wm in sorted(workers.items())}
    return {
        "units": len(ms), "rows": sum(m.rows for m in ms),
        "completion_tokens": sum(m.completion_tokens for m in ms),
        "prompt_tokens_reused": sum(m.prompt_tokens_reused for m in ms),
        "workers": rates, "tokens_per_s": round(sum(r["tokens_per_s"] for r in rates.values()), 1),
    }


def _rate(ms: list[UnitStats], run_id: str | None) -> dict:
    mine = [m for m in ms if run_id is None or m.run_id == run_id] or ms
    span = max(m.finished_at for m in mine) - min(m.started_at for m in mine) if mine else 0.0
    toks = sum(m.completion_tokens for m in mine)
    return {"units": len(ms), "rows": sum(m.rows for m in ms),
            "completion_tokens": sum(m.completion_tokens for m in ms),
            "tokens_per_s": round(toks / span, 1) if span > 0 else 0.0, "nodes": sorted({m.node for m in ms if m.node})}
