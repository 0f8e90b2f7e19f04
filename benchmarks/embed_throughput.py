"""Embedding throughput: the llama.cpp embedder alone against a full `runner submit` of a task embed job.

Writes N prompts of 4..32 words (Parquet for the job), then prints one table:

  1. the engine alone (LlamaCppEmbedder): every prompt added, stepped until done, in this process
  2. `runner submit` of a `task: embed` job over the same prompts (local Ray, Parquet in and out), as rows/s
     over the worker's busy span (first unit started to last unit committed, from the commit markers) and
     over the whole submit (Ray start and model load included)

The model defaults to the generated tiny llama (128 wide, 2 layers), which llama.cpp mean-pools.

Run:  python benchmarks/embed_throughput.py [--prompts 10000] [--model PATH.gguf] [--parallel 32] [--n-batch 512]
                                           [--threads 2] [--flash-attn]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from measure import Row, submit  # benchmarks/measure.py, beside this script

from runner.engines.base import Request
from runner.engines.llamacpp.embed import LlamaCppEmbedder
from runner.tinymodel import _WORDS, write_tiny_model


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 32))) for _ in range(n)]


def run_engine(model: str, prompts: list[str], args) -> Row:
    engine = LlamaCppEmbedder(model, n_ctx=args.n_ctx, parallel=args.parallel, n_threads=args.threads,
                              n_batch=args.n_batch, flash_attn=args.flash_attn)
    engine.add(Request(-1, prompts[0]))  # warm up
    while engine.has_unfinished():
        engine.step()
    started, tokens = time.perf_counter(), 0
    for i, p in enumerate(prompts):
        engine.add(Request(i, p))
    while engine.has_unfinished():
        tokens += sum(c.prompt_tokens for c in engine.step())
    seconds = time.perf_counter() - started
    engine.close()
    return Row(f"engine alone, parallel {args.parallel}", len(prompts), 0, seconds,
               f"{tokens / seconds:,.0f} prompt tok/s")


def run_job(workdir: Path, model: str, prompts: list[str], args) -> tuple[Row, Row]:
    data = workdir / "embed-in"
    data.mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), data / "prompts.parquet",
                   row_group_size=args.unit_rows)
    out = workdir / "embed-out"
    spec = {
        "name": "embed-bench", "task": "embed",
        "input": {"path": str(data), "id_column": "id"},
        "output": {"path": str(out)},
        "workers": [{"engine": "llamacpp", "model": model, "replicas": 1, "num_cpus": args.threads,
                     "n_ctx": args.n_ctx, "n_batch": args.n_batch, "parallel": args.parallel,
                     "flash_attn": args.flash_attn}],
        "unit_rows": args.unit_rows, "prefetch_units": 2,
    }
    seconds, manifest = submit(spec, workdir / "embed.yaml", out, "the embed job")
    rows = manifest["rows_ok"]
    return (Row("job: worker busy span", rows, 0, _busy_seconds(str(out)), f"{manifest['units_committed']} units"),
            Row("job: whole submit, Ray start and model load included", rows, 0, seconds))


def _busy_seconds(out: str) -> float:
    """First unit started to last unit committed, per worker, summed over workers (one replica here)."""
    from runner.output.ledger import Ledger
    from runner.storage.location import Location

    spans: dict[str, list[float]] = {}
    for m in Ledger.load(Location.open(out, {})).stats:
        s = spans.setdefault(m.worker, [m.started_at, m.finished_at])
        s[0], s[1] = min(s[0], m.started_at), max(s[1], m.finished_at)
    return sum(f - s for s, f in spans.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=10_000)
    ap.add_argument("--model", help="a GGUF to embed with (default: the generated tiny llama)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--parallel", type=int, default=32, help="most prompts in one decode call")
    ap.add_argument("--n-ctx", type=int, default=128, help="longest prompt, in tokens")
    ap.add_argument("--n-batch", type=int, default=512, help="most tokens in one decode call")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (faster large batches)")
    ap.add_argument("--unit-rows", type=int, default=1000)
    ap.add_argument("--skip", nargs="*", default=[], choices=["engine", "job"])
    ap.add_argument("--workdir", help="keeps the model and data here (default: a temporary directory)")
    args = ap.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="runner-embed-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or str(workdir / "tiny.gguf")
    if not os.path.exists(model):
        write_tiny_model(model)
    prompts = make_prompts(args.prompts, seed=1)
    print(f"model {model} ({os.path.getsize(model) / 1e6:.1f} MB), {args.threads} threads, {len(prompts):,} "
          f"prompts of 4..32 words, parallel {args.parallel}, n_batch {args.n_batch}, "
          f"flash attention {'on' if args.flash_attn else 'off'}", flush=True)

    rows: list[Row] = []
    if "engine" not in args.skip:
        row = run_engine(model, prompts, args)
        rows.append(row)
        print(f"  {row.name}: {row.prompts / row.seconds:,.1f} rows/s", flush=True)
    if "job" not in args.skip:
        for row in run_job(workdir, model, prompts, args):
            rows.append(row)
            print(f"  {row.name}: {row.prompts / row.seconds:,.1f} rows/s", flush=True)

    base = rows[0].prompts / rows[0].seconds if rows and rows[0].name.startswith("engine") else None
    print()
    head = f"{'run':<56} {'rows':>7} {'seconds':>8} {'rows/s':>9} {'x engine':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        rate = r.prompts / r.seconds if r.seconds else 0.0
        ratio = f"{rate / base:>8.2f}x" if base else f"{'':>9}"
        note = f"  ({r.note})" if r.note else ""
        print(f"{r.name:<56} {r.prompts:>7} {r.seconds:>8.2f} {rate:>9.1f} {ratio}{note}")


if __name__ == "__main__":
    main()
