"""Output files of a useful size: one echo job of `--rows` rows at `--unit-rows`, run once per
`output.target_file_mb`, 0 (a file a unit, the baseline) first, on local disk.

    python benchmarks/output_files.py                              # 1,000,000 rows at unit_rows 256
    python benchmarks/output_files.py --rows 100000 --targets 0,1,256

Each run is `runner submit` in a child process, timed. The table gives the files written, their mean and
largest size, the run's wall time and its ratio to the baseline's, and whether DuckDB's
`read_parquet('out/*.parquet')` counts every input row exactly once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq


def run(d: Path, rows: int, unit_rows: int, target: float) -> dict:
    out = d / f"out-{target:g}"
    job = {"name": f"files-{target:g}", "input": {"path": str(d / "in.parquet")},
           "output": {"path": str(out), "target_file_mb": target}, "unit_rows": unit_rows,
           "sampling": {"max_tokens": 16}, "workers": [{"engine": "echo", "replicas": 2, "num_cpus": 0.5}]}
    path = d / f"job-{target:g}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in job.items()))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "runner.cli", "submit", "--no-dashboard", "--no-progress", str(path)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    files = sorted(out.glob("*.parquet"))
    sizes = [f.stat().st_size / 1e6 for f in files]
    n, distinct = duckdb.sql(f"select count(*), count(distinct source_row) from '{out}/*.parquet'").fetchall()[0]
    return {"target MB": target, "files": len(files), "mean MB": sum(sizes) / len(sizes), "max MB": max(sizes),
            "wall s": wall, "rows once": n == distinct == rows, "waiting parts": len(list(out.glob("_parts/*")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--unit-rows", type=int, default=256)
    p.add_argument("--targets", default="0,16,256", help="comma-separated target_file_mb values; 0 first")
    args = p.parse_args()
    targets = [float(x) for x in args.targets.split(",")]
    with tempfile.TemporaryDirectory(prefix="output-files-") as tmp:
        d = Path(tmp)
        prompts = pa.array([f"prompt {i} asks for a few words about the weather today" for i in range(args.rows)])
        pq.write_table(pa.table({"prompt": prompts}), d / "in.parquet", row_group_size=args.unit_rows * 64)
        rows = []
        for target in targets:
            rows.append(run(d, args.rows, args.unit_rows, target))
            print(rows[-1], flush=True)
    base = rows[0]["wall s"]
    units = -(-args.rows // args.unit_rows)
    print(f"\n{args.rows:,} rows, unit_rows {args.unit_rows} ({units:,} units), echo engine, 2 replicas, local disk\n")
    cols = ("target MB", "files", "mean MB", "max MB", "wall s", "vs target 0", "rows once", "waiting parts")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [f"{r['target MB']:g}", f"{r['files']:,}", f"{r['mean MB']:.3f}", f"{r['max MB']:.2f}",
                 f"{r['wall s']:.1f}", f"{r['wall s'] / base:.2f}", "yes" if r["rows once"] else "NO",
                 str(r["waiting parts"])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
