"""How close `runner plan --calibrate` comes to the real job: for each job size, the calibrated ETA next to the
wall time of a `runner submit` of the same job, each command a fresh process with its own embedded Ray, as a
user runs them. The tiny random-weight GGUF; 2 llama.cpp replicas of 1 CPU.

    python benchmarks/plan_eta.py [--rows 2000 20000] [--max-tokens 32] [--workdir /tmp/plan-eta]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from measure import submit  # noqa: E402

WORDS = ["price", "quality", "service", "delivery", "battery", "screen", "sound", "size", "good", "bad"]


def write_prompts(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [f"Summarize review {i}: the {WORDS[i % 8]} was {WORDS[8 + i % 2]} and " + " ".join(
        WORDS[(i * k) % 8] for k in range(i % 7)) for i in range(rows)]
    for s in range(4):
        part = prompts[s::4]
        pq.write_table(pa.table({"id": list(range(s, rows, 4)), "prompt": part}), folder / f"p-{s}.parquet",
                       row_group_size=250)


def job(work: Path, rows: int, model: str, max_tokens: int) -> dict:
    return {"name": f"eta-{rows}", "input": {"path": str(work / f"in-{rows}")},
            "output": {"path": str(work / f"out-{rows}")}, "sampling": {"max_tokens": max_tokens},
            "workers": [{"engine": "llamacpp", "name": "cpu", "model": model, "replicas": 2, "num_cpus": 1,
                         "n_ctx": 256, "parallel": 16, "cost_per_hour": 0.10}],
            "unit_rows": 250}


def plan(path: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "plan", str(path), "--calibrate", "--json"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"runner plan failed:\n{proc.stderr}")
    return time.perf_counter() - started, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workdir", default="/tmp/plan-eta")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny.gguf"
    if not model.exists():
        from runner.tinymodel import write_tiny_model

        write_tiny_model(str(model))
    print(f"{'rows':>7} {'plan --calibrate s':>19} {'ETA s':>7} {'job wall s':>11} {'submit s':>9} "
          f"{'ETA / wall':>11} {'rows/s est':>11} {'rows/s job':>11} {'cost':>8}")
    for rows in a.rows:
        write_prompts(work / f"in-{rows}", rows)
        spec = job(work, rows, str(model), a.max_tokens)
        path = work / f"job-{rows}.yaml"
        path.write_text(yaml.safe_dump(spec))
        plan_s, est = plan(path)
        submit_s, manifest = submit(spec, path, work / f"out-{rows}")
        eta, wall = est["eta"]["total_s"], manifest["wall_time_s"]
        busy = manifest["rows_total"] / max(1e-9, wall)
        print(f"{rows:>7} {plan_s:>19.1f} {eta:>7.1f} {wall:>11.1f} {submit_s:>9.1f} {eta / wall:>10.2f}x "
              f"{est['eta']['rows_per_s']:>11.0f} {busy:>11.0f} {est['eta']['cost']:>8.5f}")


if __name__ == "__main__":
    main()
