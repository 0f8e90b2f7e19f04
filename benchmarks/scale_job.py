"""A whole job at scale, on a moto S3 server: `runner submit` of an echo job in a child process, `runner status`
timed while it runs, the driver killed mid-job (its whole session, as a lost head node), `runner status` timed
after the kill, then the resubmit timed to its first new lease and to its end.

    python benchmarks/scale.py --modes job --job-replicas 8 --job-units 10000 --seed 0,100000

`--seed N` first commits N units more (the job has N + units units) as the driver leaves them folded: ledger
segments of their stats, FOLD_AT rows each and merged every MERGE_AT, written with the real Ledger; their data
objects are not written (moto takes about 240 PUTs/s on a 2-core machine, so committing 100,000 units through
workers takes over half an hour). The run then works on the other `units` on top of them: status, the kill and
the resume meet a location holding N + units committed units, and the files counted are those the run wrote.

One row of the table per (replicas, units, unit rows):
- wall s: the first run until the kill, plus the resubmit to its end;
- leases/s, commits/s: units over the seconds the resubmit's coordinator spent leasing and committing them;
- coord CPU %: the resubmit's coordinator process (`ray::Coordinator`), CPU over its wall time, psutil;
- driver RSS: the peak of either driver process (`runner submit`), MiB, sampled every 0.2 s;
- status s: the slowest `runner status` while the job ran and the one after the kill (each a new process);
- resume s: the resubmit's process start to its first new lease (its RUNNER_TIMINGS line);
- files, mean file MB: the `*.parquet` objects under the output at the end, and their mean size.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from ledger_scale import S3_KEY, S3_SECRET, start_moto  # noqa: E402

JOB_COLUMNS = ("replicas", "units", "seeded", "rows", "wall s", "leases/s", "commits/s", "coord CPU %",
               "driver RSS MiB", "status s (running)", "status s (killed)", "resume s", "files", "mean file MB")
POLL_S = 10.0  # between the `runner status` calls while the first run goes (each a new Python process)
PHASE = re.compile(r"([a-z][a-z ]*?(?: \([^)]*\))?) (\d+\.\d+)s")


def write_job(d: Path, endpoint: str, replicas: int, units: int, unit_rows: int, **output) -> Path:
    rows = units * unit_rows
    pq.write_table(pa.table({"prompt": pa.array([f"prompt {i} with a few words" for i in range(rows)])}),
                   d / "in.parquet", row_group_size=min(rows, 1_000_000))
    job = {"name": f"scale-{units}", "input": {"path": str(d / "in.parquet")},
           "output": {"path": "s3://bench/out", "storage_options": {"endpoint_url": endpoint, "key": S3_KEY,
                                                                    "secret": S3_SECRET}, **output},
           "unit_rows": unit_rows, "max_attempts": 3,
           "workers": [{"engine": "echo", "replicas": replicas, "parallel": 64, "num_cpus": 0.01}]}
    (d / "job.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in job.items()))
    return d / "job.yaml"


class Driver:
    """`runner submit` in a session of its own; its peak RSS sampled, its stderr kept."""

    def __init__(self, job: Path, d: Path, tag: str):
        env = {**os.environ, "RUNNER_TIMINGS": "1"}
        self.err = open(d / f"{tag}.err", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "submit", "--no-dashboard", "--no-progress",
                                      str(job)], stdout=subprocess.DEVNULL, stderr=self.err, env=env,
                                     start_new_session=True)
        self.peak_mib = 0.0
        self.coord_cpu = self.coord_wall = 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        me = psutil.Process(self.proc.pid)
        coordinator, first, base = None, None, 0.0
        while self.proc.poll() is None:
            try:
                self.peak_mib = max(self.peak_mib, me.memory_info().rss / 2**20)
                if coordinator is None:  # a Ray worker process that took the actor: its CPU from now on
                    coordinator = next((p for p in psutil.process_iter(["cmdline"])
                                        if "ray::Coordinator" in " ".join(p.info["cmdline"] or [])), None)
                    first = time.time()
                    base = sum(coordinator.cpu_times()[:2]) if coordinator else 0.0
                if coordinator is not None:
                    self.coord_cpu, self.coord_wall = sum(coordinator.cpu_times()[:2]) - base, time.time() - first
            except psutil.Error:
                pass
            time.sleep(0.2)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def timings(self) -> list[tuple[str, float]]:
        self.err.seek(0)
        line = next((x for x in self.err.read().splitlines() if "timings:" in x), "")
        return [(m.group(1), float(m.group(2))) for m in PHASE.finditer(line.split("timings:", 1)[-1])]


def status(job: Path) -> tuple[float, dict]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "runner.cli", "status", "--json", str(job)], capture_output=True,
                         text=True, check=True).stdout
    return time.perf_counter() - t, json.loads(out)


def seed(job: Path, n: int) -> None:
    """The job begun, and its first `n` units committed as a driver folding its workers' commits leaves them."""
    from runner.inputs.plan import make_plan
    from runner.output.ledger import FOLD_AT, Ledger
    from runner.output.store import OutputStore, UnitStats
    from runner.spec.job import load_spec

    spec, resolved = load_spec(job)
    plan = make_plan(spec)
    store = OutputStore(spec)
    store.begin(plan, resolved, overwrite=False)
    ledger = Ledger.load(store.loc)
    t = time.time() - n / 50
    for i in range(0, n, FOLD_AT):
        ledger.add(UnitStats(unit_id=u.id, rows=u.num_rows, rows_ok=u.num_rows, rows_failed=0, prompt_tokens=6,
                             completion_tokens=6, pool="echo0", worker=f"echo0-{j % 8}", run_id="seeded000000",
                             started_at=t + j / 50, finished_at=t + j / 50 + 0.1, node="n" * 56)
                   for j, u in enumerate(plan.units[i:min(i + FOLD_AT, n)], start=i))
        ledger.fold()
    ledger.fold(at=1)  # the last, smaller batch too: a seeded unit has no marker to fall back on


def job_row(replicas: int, units: int, unit_rows: int, kill_at: float, seeded: int = 0, **output) -> dict:
    moto, endpoint = start_moto()
    try:
        import s3fs

        s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=endpoint).mkdir("bench")
        with tempfile.TemporaryDirectory(prefix="scale-job-") as tmp:
            return _job_row(Path(tmp), endpoint, replicas, units, unit_rows, kill_at, seeded, output)
    finally:
        moto.kill()


def _job_row(d: Path, endpoint: str, replicas: int, units: int, unit_rows: int, kill_at: float, seeded: int,
             output: dict) -> dict:
    job = write_job(d, endpoint, replicas, seeded + units, unit_rows, **output)
    if seeded:
        t = time.perf_counter()
        seed(job, seeded)
        print(f"  seeded {seeded:,} committed units in {time.perf_counter() - t:.0f}s", flush=True)
    t0 = time.perf_counter()
    first = Driver(job, d, "first")
    running, done = [], 0
    while first.proc.poll() is None and done < seeded + kill_at * units:
        time.sleep(POLL_S)
        secs, s = status(job)
        running.append(secs)
        done = s.get("units_done") or 0
    first.kill()
    first_wall = time.perf_counter() - t0
    killed_s, s = status(job)
    print(f"  killed the driver at {s['units_done']:,} of {seeded + units:,} units committed, {first_wall:.0f}s in; "
          f"status then took {killed_s:.2f}s", flush=True)
    t1 = time.perf_counter()
    second = Driver(job, d, "resume")
    second.proc.wait()
    resume_wall = time.perf_counter() - t1
    phases = second.timings()
    if second.proc.returncode != 0:
        second.err.seek(0)
        raise RuntimeError(f"the resubmit failed: {second.err.read()[-2000:]}")
    upto = 0.0
    for name, secs in phases:
        upto += secs
        if name.startswith("workers up"):
            break
    leasing = sum(secs for name, secs in phases if name in ("first unit", "units"))
    left = seeded + units - s["units_done"]
    import s3fs

    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=endpoint)
    files = [f for f in fs.find("bench/out", detail=True).values() if f["name"].endswith(".parquet")]
    written = pq.read_table([f["name"] for f in files], filesystem=fs, columns=["source_row"]).column(0)
    once = sorted(written.to_pylist()) == list(range(seeded * unit_rows, (seeded + units) * unit_rows))
    print(f"  {len(written):,} rows written by the runs: {'each once' if once else 'NOT each once'}", flush=True)
    return {"replicas": replicas, "units": seeded + units, "rows": (seeded + units) * unit_rows,
            "seeded": seeded, "wall s": first_wall + resume_wall,
            "leases/s": left / leasing if leasing else float("nan"),
            "commits/s": left / leasing if leasing else float("nan"),
            "coord CPU %": 100 * second.coord_cpu / second.coord_wall if second.coord_wall else float("nan"),
            "driver RSS MiB": max(first.peak_mib, second.peak_mib),
            "status s (running)": max(running) if running else float("nan"), "status s (killed)": killed_s,
            "resume s": upto, "files": len(files),
            "mean file MB": sum(f["size"] for f in files) / len(files) / 1e6 if files else 0.0}
