"""GPU throughput: the runner's vLLM engine and a full job against a bare `vllm.LLM.generate` baseline.

On a GPU node with vLLM installed, over the same N prompts and greedy sampling, prints one table:

  1. bare vllm.LLM(...).generate(prompts): vLLM's own offline batch path (the baseline)
  2. the runner's vLLM engine alone: the continuous-batching loop over units of --unit-rows rows
  3. a full `runner submit` job on an embedded local Ray (Parquet in, Parquet out): the worker's
     busy time, and the whole submit with Ray start and model load

The runs go one after another, each releasing the GPU before the next. The job runs first, in a Ray
worker process, so the driver holds no GPU memory then.

Run:  python benchmarks/vllm_throughput.py --model /models/Qwen2.5-0.5B-Instruct [--prompts 2000]
      [--max-tokens 128] [--engine-args '{"max_num_seqs": 256}']
      --standin runs it against tests/standins/vllm (no GPU; checks the script, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from measure import Row  # benchmarks/measure.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["a lighthouse", "the stock market", "a recipe for bread", "the moon landing", "a chess opening",
          "a rainy city", "an old library", "quantum computing", "a mountain village", "the ocean floor"]


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Write a detailed essay about {rng.choice(TOPICS)}, part {i}, in {rng.randint(3, 9)} paragraphs."
            for i in range(n)]


def run_bare(model: str, prompts: list[str], max_tokens: int, engine_args: dict) -> Row:
    import vllm

    llm = vllm.LLM(model, **engine_args)
    params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    llm.llm_engine.engine_core.shutdown()
    del llm
    _free_gpu()
    return Row("bare vllm.LLM.generate", len(prompts), sum(len(o.outputs[0].token_ids) for o in outs), seconds)


def run_engine(model: str, prompts: list[str], max_tokens: int, engine_args: dict, unit_rows: int) -> Row:
    from runner.batching import END, BatchLoop, UnitWork
    from runner.engines import create_engine
    from runner.plan import Unit
    from runner.rows import Rows
    from runner.spec import Sampling, parse_spec

    spec = parse_spec({"name": "bench", "input": {"path": "/unused"}, "output": {"path": "/unused"},
                       "workers": [{"engine": "vllm", "model": model, "engine_args": engine_args}]}, {})[0]
    engine = create_engine(spec.workers[0], spec)
    works = [UnitWork(Unit(f"u{i}", "f", i, len(chunk), (0,), 0), 1, pa.table({"p": chunk}), Rows(chunk))
             for i, chunk in enumerate(prompts[j:j + unit_rows] for j in range(0, len(prompts), unit_rows))]

    class Feed:
        def get(self, block):
            return works.pop(0) if works else END

    done: list = []
    started = time.perf_counter()
    BatchLoop(engine, Feed(), done.append, Sampling(max_tokens=max_tokens)).run()
    seconds = time.perf_counter() - started
    engine.close()
    del engine
    _free_gpu()
    tokens = sum(c.completion_tokens for w in done for c in w.results)
    return Row(f"runner vLLM engine alone, units of {unit_rows}", len(prompts), tokens, seconds)


def run_job(workdir: Path, model: str, prompts: list[str], max_tokens: int, engine_args: dict, unit_rows: int,
            env: dict) -> tuple[Row, Row]:
    data = workdir / "in"
    data.mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), data / "prompts.parquet",
                   row_group_size=unit_rows)
    spec = {"name": "vllm-bench", "input": {"path": str(data), "id_column": "id"},
            "output": {"path": str(workdir / "out")},
            "sampling": {"max_tokens": max_tokens, "temperature": 0.0},
            "workers": [{"engine": "vllm", "name": "gpu", "model": model, "engine_args": engine_args,
                         **({"num_gpus": 0} if env.get("VLLM_STANDIN") else {})}],
            "unit_rows": unit_rows, "prefetch_units": 4}
    job = workdir / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "submit", str(job), "--overwrite", "--no-progress",
                           "--no-dashboard"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"job failed:\n{proc.stdout}\n{proc.stderr}")
    manifest = json.loads((workdir / "out" / "_manifest.json").read_text())
    tokens = manifest["completion_tokens"]
    rate = manifest["pools"]["gpu"]["tokens_per_s"]
    return (Row("runner job: worker busy time", len(prompts), tokens, tokens / rate if rate else 0.0),
            Row("runner job: whole submit, Ray start and model load included", len(prompts), tokens, seconds))


def _free_gpu() -> None:
    gc.collect()
    try:
        import torch

        torch.cuda.empty_cache()
    except ImportError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face id or a local model directory")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--unit-rows", type=int, default=256)
    ap.add_argument("--engine-args", default="{}", help="JSON: vLLM EngineArgs for every run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--standin", action="store_true", help="use tests/standins/vllm instead of vLLM")
    args = ap.parse_args()
    engine_args = json.loads(args.engine_args)
    env = dict(os.environ)
    if args.standin:
        standins = str(ROOT / "tests" / "standins")
        sys.path.insert(0, standins)
        env.update(PYTHONPATH=f"{standins}:{env.get('PYTHONPATH', '')}", VLLM_STANDIN="1")
    prompts = make_prompts(args.prompts, args.seed)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        rows += run_job(Path(tmp), args.model, prompts, args.max_tokens, engine_args, args.unit_rows, env)
    rows.append(run_engine(args.model, prompts, args.max_tokens, engine_args, args.unit_rows))
    rows.append(run_bare(args.model, prompts, args.max_tokens, engine_args))

    base = rows[-1].rate
    print(f"\nmodel {args.model}, {args.prompts} prompts, max_tokens {args.max_tokens}, greedy, engine_args "
          f"{json.dumps(engine_args)}" + ("  [STAND-IN, not vLLM]" if args.standin else ""))
    print(f"{'run':60} {'prompts':>7} {'tokens':>9} {'seconds':>8} {'tok/s':>9} {'x bare':>7}")
    for r in [rows[-1], *rows[:-1]]:
        print(f"{r.name:60} {r.prompts:7d} {r.completion_tokens:9d} {r.seconds:8.2f} {r.rate:9.1f} "
              f"{r.rate / base if base else 0:6.2f}x")


if __name__ == "__main__":
    main()
