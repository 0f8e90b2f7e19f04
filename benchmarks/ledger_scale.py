"""How the ledger scales: `runner status`, `finish` and a resume over a job of many committed units, on local
disk and on a moto S3 server; and the driver's peak RSS at few and at many rows over the same units.

    python benchmarks/ledger_scale.py                        # 100,000 units, local disk and moto S3
    python benchmarks/ledger_scale.py --units 2000 --rows 100000 --storage local   # a quick try

No engine runs for the ledger table: an input of one row group of units x unit_rows rows plans into
`--units` units, and each unit's data object and marker are written through OutputStore, as a worker
commits, from parallel threads. The RSS rows run `runner submit` of an echo-engine job in a child process.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from runner.cluster.ray import RunOptions
from runner.engines.base import Completion
from runner.inputs.plan import make_plan
from runner.job import finish, run_job
from runner.output.ledger import LEDGER
from runner.output.store import COMMITS, OutputStore, UnitStats
from runner.spec.job import load_spec

S3_KEY, S3_SECRET = "bench-key", "bench-secret"
READ = re.compile(r"ledger \S+: (\d+) units, \d+ in \d+ segments, (\d+) markers read")

# moto in its own process, so its request handling does not share this process's GIL with what is timed.
MOTO = """import sys, threading
from moto.server import ThreadedMotoServer
ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False).start()
threading.Event().wait()"""

# `runner` as a child that writes its own peak RSS (kB) to argv[1] on the way out. VmHWM, not ru_maxrss: on
# Linux a child's ru_maxrss starts at its parent's peak (kept over fork and exec), which is this script's.
RSS_CHILD = """import atexit, re, sys
out = sys.argv.pop(1)
peak = lambda: re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
atexit.register(lambda: open(out, "w").write(peak()))
from runner.cli import main
main()"""


class MarkerReads(logging.Handler):
    """Adds up the markers each ledger load says it read (its debug line)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.loads = self.read = 0

    def emit(self, record):
        m = READ.search(record.getMessage())
        if m:
            self.loads, self.read = self.loads + 1, self.read + int(m.group(2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", MOTO, str(port)], stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto did not start")


def write_job(d: Path, output: str, options: dict, units: int, unit_rows: int, row_group: int,
              parallel: int = 8, **top) -> Path:
    """An echo job over one input file of units x unit_rows short prompts."""
    rows = units * unit_rows
    pq.write_table(pa.table({"prompt": pa.array(["a few short words"] * rows)}), d / "in.parquet",
                   row_group_size=row_group)
    job = {"name": f"ledger-{units}", "input": {"path": str(d / "in.parquet")},
           "output": {"path": output, "storage_options": options}, "unit_rows": unit_rows,
           "workers": [{"engine": "echo", "parallel": parallel, "num_cpus": 1}], **top}
    (d / "job.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in job.items()))
    return d / "job.yaml"


def commit_all(store: OutputStore, plan, run_id: str, threads: int) -> list[UnitStats]:
    """Every unit committed as a worker would: data object, then marker; every 7th with one failed row."""
    def one(i_unit):
        i, unit = i_unit
        results = [Completion(r, "a few short words", "stop", 4, 4) for r in range(unit.num_rows)]
        if i % 7 == 0:
            results[0] = Completion.failed(0, "null_prompt: the prompt is null")
        t = time.time()
        inputs = pa.table({"_": pa.nulls(unit.num_rows)})
        return store.commit_results(unit, inputs, results, pool="echo0", worker=f"echo0-{i % 4}", run_id=run_id,
                                    started_at=t, finished_at=t + 0.01)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, enumerate(plan.units)))


def timed(table: list, storage: str, step: str, reads: MarkerReads, fn) -> object:
    reads.loads = reads.read = 0
    t = time.perf_counter()
    out = fn()
    read = f"{reads.read} in {reads.loads} loads" if reads.loads else "-"
    table.append((storage, step, time.perf_counter() - t, read))
    return out


def status_cli(job: Path, reads: MarkerReads) -> None:
    """`runner -v status` in a child; its ledger debug lines tell the markers it read."""
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "-v", "status", str(job)], capture_output=True,
                          text=True, check=True)
    for m in READ.finditer(proc.stderr):
        reads.loads, reads.read = reads.loads + 1, reads.read + int(m.group(2))


def ledger_rows(storage: str, d: Path, args, reads: MarkerReads, endpoint: str | None) -> list:
    table: list = []
    output = str(d / "out") if storage == "local" else "s3://bench/out"
    options = {"endpoint_url": endpoint, "key": S3_KEY, "secret": S3_SECRET} if endpoint else {}
    job = write_job(d, output, options, args.units, args.unit_rows, args.units * args.unit_rows,
                    max_failed_rows=0.5)
    spec, resolved = load_spec(job)
    store = OutputStore(spec)
    if endpoint:
        store.loc.fs.mkdir("bench")
    plan = timed(table, storage, "plan (one footer)", reads, lambda: make_plan(spec))
    store.begin(plan, resolved, overwrite=False)
    run_id, started = "bench0000001", time.time()
    known = timed(table, storage, f"setup: commit {len(plan.units)} units ({args.threads} threads)", reads,
                  lambda: commit_all(store, plan, run_id, args.threads))
    timed(table, storage, "one listing of _commits/ (reference)", reads, lambda: store.loc.list(COMMITS))
    timed(table, storage, "python start, import runner.cli (reference for status)", reads,
          lambda: subprocess.run([sys.executable, "-c", "import runner.cli, runner.job"], check=True))
    timed(table, storage, "runner status, no summary yet", reads, lambda: status_cli(job, reads))
    skipped = len(plan.units)
    timed(table, storage, "finish #1, no summary: reads every marker, rolls", reads,
          lambda: finish(spec, store, plan, run_id, started, skipped))
    timed(table, storage, "finish #2, from the summary", reads,
          lambda: finish(spec, store, plan, run_id, started, skipped))
    timed(table, storage, "runner status, from the summary", reads, lambda: status_cli(job, reads))
    assert "ray" not in sys.modules

    def resume() -> bool:
        run_job(spec, resolved, RunOptions(dashboard=False, progress=False))
        return "ray" in sys.modules

    ray = timed(table, storage, "resume: run_job with nothing left to run", reads, resume)
    table[-1] = (storage, f"{table[-1][1]} (Ray imported: {'yes' if ray else 'no'})", *table[-1][2:])
    store.loc.fs.rm_file(store.loc.path(LEDGER))
    timed(table, storage, "finish, no summary, known = the run's own stats", reads,
          lambda: finish(spec, store, plan, run_id, started, skipped, known=known))
    return table


def peak_rss(d: Path, units: int, rows: int) -> tuple[int, float, float]:
    """`runner submit` of an echo job of `rows` rows in `units` units: (rows, driver peak RSS MiB, wall s)."""
    d.mkdir()
    per = max(1, rows // units)
    job = write_job(d, str(d / "out"), {}, units, per, per, parallel=4096)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", RSS_CHILD, str(d / "rss"), "submit", "--no-dashboard", "--no-progress",
                    str(job)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return units * per, int((d / "rss").read_text()) / 1024, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, default=100_000, help="units of the ledger job")
    p.add_argument("--unit-rows", type=int, default=1, help="rows a unit of the ledger job")
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the large echo job (the small one: 10,000)")
    p.add_argument("--rss-units", type=int, default=100, help="units of both echo jobs")
    p.add_argument("--storage", default="local,s3", help="local, s3 or both, comma separated")
    p.add_argument("--threads", type=int, default=32, help="threads that commit units in the setup")
    p.add_argument("--no-rss", action="store_true", help="skip the peak RSS runs")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # the ledger's debug lines only reach `reads`
    reads = MarkerReads()
    logging.getLogger("runner.output.ledger").setLevel(logging.DEBUG)
    logging.getLogger("runner.output.ledger").addHandler(reads)
    rows: list = []
    with tempfile.TemporaryDirectory(prefix="ledger-scale-") as tmp:
        for storage in args.storage.split(","):
            moto, endpoint = start_moto() if storage == "s3" else (None, None)
            try:
                (Path(tmp) / storage).mkdir()
                rows += ledger_rows(storage, Path(tmp) / storage, args, reads, endpoint)
            finally:
                if moto:
                    moto.kill()
        rss = [] if args.no_rss else [peak_rss(Path(tmp) / f"rss{n}", args.rss_units, n) for n in (10_000, args.rows)]
    print(f"\n{'storage':7}  {'step':64}  {'seconds':>8}  markers read")
    for storage, step, secs, note in rows:
        print(f"{storage:7}  {step:64}  {secs:8.2f}  {note}")
    if rss:
        print(f"\n{'rows':>10}  {'units':>6}  {'driver peak RSS MiB':>19}  {'wall s':>7}")
        for n, mib, secs in rss:
            print(f"{n:10,}  {args.rss_units:6}  {mib:19.0f}  {secs:7.1f}")
    print(f"\n(this process's own peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
