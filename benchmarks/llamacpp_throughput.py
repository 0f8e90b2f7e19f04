"""CPU throughput: the llama.cpp engine and a full job against a naive one-prompt-at-a-time baseline.

Generates a ~125M-parameter random llama GGUF (dim 768, 12 layers, 12 heads / 4 KV heads, ff 2048,
vocab 32000, Q8_0) and N prompts of a fixed token length, then prints one table:

  1. naive: llama-cpp-python's Llama.create_completion, one prompt at a time (the baseline)
  2. the engine alone at parallel 1 / 4 / 8 / 16
  3. a full `runner submit` job on the same prompts (local Ray, Parquet in and out)
  4. the same job with a shared prefix on every prompt, prefix reuse off and on
  5. with --llama-server PATH: llama.cpp's own C++ server on the same prompts over 127.0.0.1, at
     --parallel 16 (the "x server16" column) and at the jobs' parallel

Run:  python benchmarks/llamacpp_throughput.py [--prompts 128] [--threads 2] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from measure import Row, submit  # benchmarks/measure.py, beside this script

from runner.engines.base import Request
from runner.engines.llamacpp.generate import LlamaCppEngine
from runner.spec.sampling import Sampling
from runner.tinymodel import _WORDS, TinyConfig, write_tiny_gguf

MODEL_125M = TinyConfig(n_embd=768, n_layer=12, n_head=12, n_head_kv=4, n_ff=2048, n_vocab=32000, quant="Q8_0")


def make_prompts(engine: LlamaCppEngine, n: int, tokens: int, seed: int) -> list[str]:
    """n distinct prompts of exactly `tokens` tokens each, BOS included."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        words: list[str] = []
        while len(engine.tokenize(" ".join(words))) < tokens:
            words.append(rng.choice(_WORDS))
        text = " ".join(words)
        if len(engine.tokenize(text)) == tokens and text not in out:
            out.append(text)
    return out


def make_prefix(engine: LlamaCppEngine, tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["You", "are", "a", "careful", "assistant."]
    while len(engine.tokenize(" ".join(words))) < tokens:
        words.append(rng.choice(_WORDS))
    return " ".join(words) + "\n"


def run_naive(model: str, prompts: list[str], new_tokens: int, threads: int, n_ctx: int) -> Row:
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                flash_attn=False, verbose=False)
    llm.create_completion(prompts[0], max_tokens=4, temperature=0.0)  # warm up
    started, toks = time.perf_counter(), 0
    for p in prompts:
        out = llm.create_completion(p, max_tokens=new_tokens, temperature=0.0)
        toks += out["usage"]["completion_tokens"]
    seconds = time.perf_counter() - started
    llm.close()
    return Row("naive: Llama.create_completion, one prompt at a time", len(prompts), toks, seconds)


def run_engine(model: str, prompts: list[str], new_tokens: int, threads: int, n_ctx: int = 512, parallel: int = 16,
               **kwargs) -> Row:
    engine = LlamaCppEngine(model, n_ctx=n_ctx, parallel=parallel, n_threads=threads, **kwargs)
    sampling = Sampling(max_tokens=new_tokens, temperature=0.0)
    engine.add(Request(-1, prompts[0], sampling.model_copy(update={"max_tokens": 4})))  # warm up
    while engine.has_unfinished():
        engine.step()
    started, toks = time.perf_counter(), 0
    for i, p in enumerate(prompts):
        engine.add(Request(i, p, sampling))
    while engine.has_unfinished():
        toks += sum(c.completion_tokens for c in engine.step())
    seconds = time.perf_counter() - started
    saved = engine.prefix_tokens_reused
    engine.close()
    note = f"{saved:,} prompt tokens reused" if saved else ""
    return Row(f"engine alone, parallel {parallel}", len(prompts), toks, seconds, note)


def run_job(workdir: Path, name: str, model: str, prompts: list[str], new_tokens: int, threads: int, n_ctx: int,
            parallel: int, unit_rows: int, prefix_reuse: bool) -> tuple[Row, Row]:
    data = workdir / f"{name}-in"
    data.mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), data / "prompts.parquet",
                   row_group_size=unit_rows)
    spec = {
        "name": name,
        "input": {"path": str(data), "id_column": "id"},
        "output": {"path": str(workdir / f"{name}-out")},
        "sampling": {"max_tokens": new_tokens, "temperature": 0.0},
        "workers": [{"engine": "llamacpp", "model": model, "replicas": 1, "num_cpus": threads, "n_ctx": n_ctx,
                     "parallel": parallel, "prefix_reuse": prefix_reuse}],
        "unit_rows": unit_rows,
        "prefetch_units": 2,
    }
    seconds, manifest = submit(spec, workdir / f"{name}.yaml", workdir / f"{name}-out", f"job {name}")
    toks = manifest["completion_tokens"]
    pool = next(iter(manifest["pools"].values()))
    busy = toks / pool["tokens_per_s"] if pool["tokens_per_s"] else 0.0
    saved = manifest.get("prompt_tokens_reused", 0)
    note = f"{saved:,} prompt tokens reused" if saved else ""
    reuse = "on" if prefix_reuse else "off"
    return (Row(f"job {name} (prefix reuse {reuse}): worker busy time", len(prompts), toks, busy, note),
            Row(f"job {name} (prefix reuse {reuse}): whole submit, Ray start and model load included",
                len(prompts), toks, seconds))


def run_llama_server(binary: str, model: str, prompts: list[str], new_tokens: int, threads: int, n_ctx: int,
                     parallel: int) -> Row:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-m", model, "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel),
                             "-c", str(n_ctx * parallel), "-b", "512", "-fa", "off", "--host", "127.0.0.1",
                             "--port", str(port), "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit("llama-server did not come up")

        def complete(prompt: str) -> int:
            body = json.dumps({"prompt": prompt, "n_predict": new_tokens, "temperature": 0.0,
                               "cache_prompt": True}).encode()
            req = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())["tokens_predicted"]

        complete(prompts[0])  # warm up
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            toks = sum(pool.map(complete, prompts))
        seconds = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait()
    return Row(f"llama-server --parallel {parallel} over HTTP", len(prompts), toks, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128, help="prompts for the batched runs")
    ap.add_argument("--naive-prompts", type=int, default=24, help="prompts for the one-at-a-time runs")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 8, 16, 64],
                    help="engine-alone runs; the jobs use the largest")
    ap.add_argument("--unit-rows", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="turns of engine-alone and job at the largest parallel")
    ap.add_argument("--llama-server", help="path to a llama-server binary to compare against")
    ap.add_argument("--workdir", help="keeps the model and data here (default: a temporary directory)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["naive", "engine", "job", "prefix", "server"])
    args = ap.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="runner-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = str(workdir / "llama-125m-q8_0.gguf")
    if not os.path.exists(model):
        write_tiny_gguf(model, MODEL_125M)
    n_ctx = 512
    top = max(args.parallel)
    probe = LlamaCppEngine(model, n_ctx=64, parallel=1)
    prompts = make_prompts(probe, args.prompts, args.prompt_tokens, seed=1)
    prefix = make_prefix(probe, args.prefix_tokens, seed=2)
    prefixed = [prefix + p for p in prompts]
    prefix_len = len(probe.tokenize(prefix))
    probe.close()
    few = prompts[: args.naive_prompts]
    print(f"model {model} ({os.path.getsize(model) / 1e6:.0f} MB), {args.threads} threads, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy; "
          f"shared prefix {prefix_len} tokens", flush=True)

    rows: list[Row] = []

    def record(row: Row) -> None:
        rows.append(row)
        print(f"  {row.name}: {row.rate:.1f} tok/s", flush=True)

    if "naive" not in args.skip:
        record(run_naive(model, few, args.new_tokens, args.threads, n_ctx))
    if "engine" not in args.skip:
        for p in args.parallel:
            if p != top or "job" in args.skip:
                record(run_engine(model, few if p == 1 else prompts, args.new_tokens, args.threads, n_ctx, p))
    if "job" not in args.skip:
        # The engine alone and the job it is compared with run in turns, best of --repeat each:
        # a shared machine's noise would otherwise swamp a few percent of overhead.
        alone, busy, whole = [], [], []
        for _ in range(args.repeat):
            alone.append(run_engine(model, prompts, args.new_tokens, args.threads, n_ctx, top))
            b, w = run_job(workdir, "plain", model, prompts, args.new_tokens, args.threads, n_ctx, top,
                           args.unit_rows, prefix_reuse=True)
            busy.append(b)
            whole.append(w)
        for group in (alone, busy, whole):
            best = max(group, key=lambda r: r.rate)
            if args.repeat > 1:
                best.note = ", ".join(filter(None, [best.note, f"best of {args.repeat}: "
                                                    + " / ".join(f"{r.rate:.1f}" for r in group)]))
            record(best)
    if "prefix" not in args.skip:
        for reuse in (False, True):
            for row in run_job(workdir, f"prefix-{'on' if reuse else 'off'}", model, prefixed, args.new_tokens,
                               args.threads, n_ctx, top, args.unit_rows, prefix_reuse=reuse):
                record(row)
    if args.llama_server and "server" not in args.skip:
        for p in sorted({16, top}):
            record(run_llama_server(args.llama_server, model, prompts, args.new_tokens, args.threads, n_ctx, p))
        if "prefix" not in args.skip:
            row = run_llama_server(args.llama_server, model, prefixed, args.new_tokens, args.threads, n_ctx, top)
            row.name += ", shared prefix"
            record(row)

    base = rows[0].rate if rows and rows[0].name.startswith("naive") else None
    server = next((r.rate for r in rows if r.name == "llama-server --parallel 16 over HTTP"), None)
    print()
    head = f"{'run':<86} {'prompts':>7} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'x naive':>8}"
    head += f" {'x server16':>10}" if server else ""
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r.name:<86} {r.prompts:>7} {r.completion_tokens:>7} {r.seconds:>8.2f} {r.rate:>7.1f}"
        line += f" {r.rate / base:>7.2f}x" if base else f" {'':>8}"
        line += f" {r.rate / server:>9.2f}x" if server else ""
        print(line + (f"  ({r.note})" if r.note else ""))
    _ratios(rows, top)


def _ratios(rows: list[Row], parallel: int) -> None:
    by = {r.name: r.rate for r in rows}
    engine = by.get(f"engine alone, parallel {parallel}")
    job = by.get("job plain (prefix reuse on): worker busy time")
    off = by.get("job prefix-off (prefix reuse off): worker busy time")
    on = by.get("job prefix-on (prefix reuse on): worker busy time")
    print()
    if engine and job:
        print(f"orchestration overhead (job worker time vs the engine alone, both at parallel {parallel}): "
              f"{100 * (1 - job / engine):.1f}%")
    if off and on:
        print(f"shared-prefix reuse on vs off: {on / off:.2f}x")


if __name__ == "__main__":
    main()
