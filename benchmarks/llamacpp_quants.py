"""The GGUF types users run, each with llama.cpp's extra buffer types (AMX, weight repacking) on and off.

Generates the ~125M-parameter random llama of llamacpp_throughput.py as F32, quantizes it with llama.cpp's
own llama_model_quantize to F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 and IQ4_XS, and for each type and
each `extra_buffers` setting times, through runner's engine:

  single: one sequence generating --tokens tokens (greedy)
  batch:  --batch prompts decoded together (parallel = --batch), --tokens each

and says whether the greedy texts are the same with the setting on and off. The ratio columns are
on / off: above 1, extra buffers (repacking, where this CPU has no AMX) speed the type up. `auto` is off
on a CPU with AMX, where llama.cpp's AMX path crashes on quantized weights, and on elsewhere.

Run:  python benchmarks/llamacpp_quants.py [--threads 2] [--tokens 64] [--batch 8] [--types Q4_0,Q8_0]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from llamacpp_throughput import MODEL_125M, make_prompts  # beside this script

from runner.engines.base import Request
from runner.engines.llamacpp.generate import LlamaCppEngine
from runner.engines.llamacpp.lib import use_extra_buffers
from runner.hardware import cpu_flags, describe_cpu
from runner.spec.sampling import Sampling
from runner.tinymodel import quantize_gguf, write_tiny_gguf

TYPES = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS"]


def run(path: str, extra: str, prompts: list[str], tokens: int, threads: int, repeat: int) -> tuple[float, list[str]]:
    """Generated tokens per second with len(prompts) sequences decoded together (the best of `repeat` runs on
    one loaded model), and their greedy texts."""
    engine = LlamaCppEngine(path, n_ctx=256, parallel=len(prompts), n_threads=threads, prefix_reuse=False,
                            extra_buffers=extra)
    best, ids = 0.0, iter(range(10**9))
    try:
        engine.add(Request(next(ids), prompts[0], Sampling(max_tokens=2)))  # warm-up, not timed
        while engine.has_unfinished():
            engine.step()
        for _ in range(repeat):
            first = next(ids)
            for i, p in enumerate(prompts):
                engine.add(Request(first + i, p, Sampling(max_tokens=tokens)))
                next(ids)
            done, started = {}, time.perf_counter()
            while engine.has_unfinished():
                done.update((c.request_id - first, c) for c in engine.step())
            best = max(best, sum(c.completion_tokens for c in done.values()) / (time.perf_counter() - started))
    finally:
        engine.close()
    return best, [done[i].text for i in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per sequence")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded together in the batch run")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best counts")
    ap.add_argument("--dir", default=None, help="where the models go (default: a temp folder)")
    args = ap.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="quants-"))
    folder.mkdir(parents=True, exist_ok=True)
    f32 = write_tiny_gguf(folder / "model-F32.gguf", dataclasses.replace(MODEL_125M, quant="F32"))
    flags = cpu_flags()
    print(f"CPU: {describe_cpu(flags)}; extra_buffers auto -> {'on' if use_extra_buffers('auto', flags) else 'off'}; "
          f"{args.threads} threads, {args.tokens} tokens a sequence, batch {args.batch}")
    probe = LlamaCppEngine(f32, n_ctx=64, parallel=1)
    prompts = make_prompts(probe, args.batch, 16, seed=1)
    probe.close()
    header = (f"{'type':8} {'MB':>6} {'single on':>10} {'single off':>11} {'on/off':>7} {'batch on':>9} "
              f"{'batch off':>10} {'on/off':>7}  same text")
    print(header + "\n" + "-" * len(header))
    for quant in args.types.split(","):
        path = quantize_gguf(f32, folder / f"model-{quant}.gguf", quant, remove_source=False)
        rates, texts = {}, {}
        for extra in ("on", "off"):
            rates[extra, "single"], _ = run(path, extra, prompts[:1], args.tokens, args.threads, args.repeat)
            rates[extra, "batch"], texts[extra] = run(path, extra, prompts, args.tokens, args.threads, args.repeat)
        mb = os.path.getsize(path) / 2**20
        print(f"{quant:8} {mb:6.0f} {rates['on', 'single']:10.1f} {rates['off', 'single']:11.1f} "
              f"{rates['on', 'single'] / rates['off', 'single']:7.2f} {rates['on', 'batch']:9.1f} "
              f"{rates['off', 'batch']:10.1f} {rates['on', 'batch'] / rates['off', 'batch']:7.2f}  "
              f"{sum(a == b for a, b in zip(texts['on'], texts['off'], strict=False))}/{len(prompts)}")
    print("tok/s of generated tokens, best of --repeat; on/off above 1: extra buffers (weight repacking here) are "
          "faster; same text: greedy texts equal with them on and off (a repacked kernel rounds differently)")


if __name__ == "__main__":
    main()
