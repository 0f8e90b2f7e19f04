"""Rows/s of a whole `runner submit` on the echo engine against the same rows through Ray Data.

Generates `--rows` short prompts in `--files` Parquet files (pyarrow's default row groups), then runs, in
turns, each in a child process of its own (so each starts a fresh Ray, and pays its own Python start,
imports and `ray.init`):

  1. runner: `runner submit` of an echo job (`--replicas` workers of one CPU each, `--unit-rows`, echo
     `--parallel`, 1024 by default: a unit a step), the default dashboard and no progress bar; timed until
     the command exits, when its parts, markers and manifest are on disk. Its phases (RUNNER_TIMINGS=1)
     are printed under its time.
  2. Ray Data: `ray.init()` (defaults, dashboard included), `read_parquet` (with each row's file and index)
     -> `map_batches` of a function that does the echo engine's work on each row (the prompt's words, at
     most max_tokens of them) and builds the columns the echo job writes (source_file, source_row, text,
     finish_reason, prompt_tokens, completion_tokens, error) -> `write_parquet`; timed until the child
     exits. Ray Data reads with its v1 Parquet reader by default, a task per file: Ray 2.60's default (v2)
     reads files this small in one task, on one CPU (`--ray-data-reader v2`).

Each output location is emptied before its run, untimed. Both outputs are read back: each must hold every
input row exactly once, with the text the echo engine gives it.

Run:  python benchmarks/raydata_compare.py [--rows 2000000] [--files 8] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import yaml

WORDS = ("alpha beta gamma delta summarize the review of item in five words please translate this sentence into "
         "french classify sentiment short prompt for a batch job").split()
MAX_TOKENS = 64


def make_data(path: Path, rows: int, files: int, seed: int = 0) -> None:
    """`rows` prompts of 4 to 12 words, in `files` files of near-equal size; each row keeps its index in its
    file (`row`), which Ray Data has no other way to know."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for i in range(files):
        n = min(per, rows - i * per)
        prompts = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in range(n)]
        pq.write_table(pa.table({"row": pa.array(range(n), pa.int64()), "prompt": prompts}),
                       path / f"prompts-{i:03d}.parquet")


def echo_batch(batch: pa.Table) -> pa.Table:
    """What the echo engine and the commit write for each row, as one Ray Data batch."""
    prompts = batch.column("prompt").to_pylist()
    words = [p.split() for p in prompts]
    return pa.table({
        "source_file": batch.column("path"),
        "source_row": batch.column("row"),
        "text": pa.array([" ".join(w[:MAX_TOKENS]) for w in words], pa.string()),
        "finish_reason": pa.array(["length" if len(w) > MAX_TOKENS else "stop" for w in words], pa.string()),
        "prompt_tokens": pa.array([len(w) for w in words], pa.int64()),
        "completion_tokens": pa.array([min(len(w), MAX_TOKENS) for w in words], pa.int64()),
        "error": pa.nulls(len(words), pa.string()),
    })


def ray_data_child(data: str, out: str, reader: str) -> None:
    """The Ray Data side, run in a child process: ray.init through write_parquet."""
    import ray

    ray.init(logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.use_datasource_v2 = reader == "v2"
    ds_ = ray.data.read_parquet(data, columns=["row", "prompt"], include_paths=True)
    ds_.map_batches(echo_batch, batch_format="pyarrow").write_parquet(out)
    ray.shutdown()


def run_runner(work: Path, data: Path, replicas: int, unit_rows: int, parallel: int, tag: str) -> float:
    out = work / f"runner-out-{tag}"
    shutil.rmtree(out, ignore_errors=True)  # each run starts from an empty output location, untimed
    spec = {"name": "raydata-compare", "input": {"path": str(data)}, "output": {"path": str(out)},
            "sampling": {"max_tokens": MAX_TOKENS},
            "workers": [{"engine": "echo", "replicas": replicas, "num_cpus": 1, "parallel": parallel}],
            "unit_rows": unit_rows}
    job = work / "echo.yaml"
    job.write_text(yaml.safe_dump(spec))
    runner = Path(sys.executable).with_name("runner")
    started = time.perf_counter()
    proc = subprocess.run([str(runner), "submit", str(job), "--overwrite", "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, "RUNNER_TIMINGS": "1"})
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"runner submit failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    phases = [ln for ln in proc.stderr.splitlines() if "timings" in ln]
    if phases:
        print("    " + phases[-1], flush=True)
    return seconds


def run_ray_data(work: Path, data: Path, reader: str, tag: str) -> float:
    out = work / f"raydata-out-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--ray-data-child", str(data), str(out), reader],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"Ray Data failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds


def check_output(out: Path, data: Path, rows: int, what: str) -> None:
    """Every input row exactly once, with the echo engine's text: a prompt of at most MAX_TOKENS words, one
    space apart (as make_data writes them), comes back as itself."""
    got = ds.dataset(out, format="parquet").to_table(columns=["source_file", "source_row", "text"])
    if got.num_rows != rows:
        raise SystemExit(f"{what}: {got.num_rows} output rows for {rows} input rows")
    got = pa.table({"f": pc.replace_substring_regex(got.column("source_file"), r"^.*/", ""),
                    "r": got.column("source_row"), "text": got.column("text")})
    want = pa.concat_tables(
        pq.read_table(p, columns=["row", "prompt"]).append_column("f", pa.array([p.name] * n))
        for p in sorted(data.glob("*.parquet")) for n in [pq.ParquetFile(p).metadata.num_rows])
    joined = got.join(want.rename_columns(["r", "prompt", "f"]), ["f", "r"])
    if joined.num_rows != rows or got.group_by(["f", "r"]).aggregate([]).num_rows != rows:
        raise SystemExit(f"{what}: output rows do not match input rows one to one")
    if not pc.all(pc.equal(joined.column("text"), joined.column("prompt"))).as_py():
        raise SystemExit(f"{what}: some rows' text is not their prompt's words")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--unit-rows", type=int, default=1024)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=1024, help="echo rows a step (the engine's capacity)")
    ap.add_argument("--repeat", type=int, default=1, help="turns of runner and Ray Data, alternating")
    ap.add_argument("--workdir", help="keeps the data and outputs here (default: a temporary directory)")
    ap.add_argument("--ray-data-reader", choices=["v1", "v2"], default="v1",
                    help="Ray Data's Parquet reader: v1 reads a file a task; v2, Ray 2.60's default, reads files "
                         "this small in one task, on one CPU (1.4x slower on 2M rows here)")
    ap.add_argument("--ray-data-child", nargs=3, metavar=("DATA", "OUT", "READER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ray_data_child:
        ray_data_child(*args.ray_data_child)
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="raydata-compare-"))
    data = work / "data"
    if not data.exists():
        make_data(data, args.rows, args.files)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(data.glob("*.parquet")))
    print(f"{rows:,} rows in {args.files} files under {data}; echo job: {args.replicas} replicas, unit_rows "
          f"{args.unit_rows}, parallel {args.parallel}; load {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, list[float]] = {"runner submit": [], "Ray Data": []}
    for turn in range(args.repeat):
        for name in (("runner submit", "Ray Data") if turn % 2 == 0 else ("Ray Data", "runner submit")):
            if name == "runner submit":
                seconds = run_runner(work, data, args.replicas, args.unit_rows, args.parallel, str(turn))
                check_output(work / f"runner-out-{turn}", data, rows, name)
            else:
                seconds = run_ray_data(work, data, args.ray_data_reader, str(turn))
                check_output(work / f"raydata-out-{turn}", data, rows, name)
            results[name].append(seconds)
            print(f"  turn {turn + 1}: {name}: {seconds:.2f}s, {rows / seconds:,.0f} rows/s", flush=True)

    best = {name: min(s) for name, s in results.items()}
    print()
    head = f"{'run':<16} {'rows':>10} {'seconds':>8} {'rows/s':>10} {'x Ray Data':>10}"
    print(head)
    print("-" * len(head))
    for name, seconds in best.items():
        note = f"  (best of {len(results[name])}: " + " / ".join(f"{s:.2f}" for s in results[name]) + ")" \
            if len(results[name]) > 1 else ""
        print(f"{name:<16} {rows:>10,} {seconds:>8.2f} {rows / seconds:>10,.0f} "
              f"{best['Ray Data'] / seconds:>9.2f}x{note}")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(json.dumps({name: round(rows / s, 1) for name, s in best.items()}))


if __name__ == "__main__":
    main()
