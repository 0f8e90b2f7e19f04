"""The vLLM engine. Without a GPU it runs against tests/standins/vllm, a stand-in for vLLM 0.24.0's
LLMEngine API; with vllm installed, a GPU and RUNNER_VLLM_MODEL (a local model directory) it runs for real."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from runner.batching import END, BatchLoop, UnitWork
from runner.engines import Request, create_engine
from runner.errors import EngineError
from runner.plan import Unit
from runner.rows import Rows
from runner.spec import Sampling, parse_spec
STANDINS = str(Path(__file__).resolve().parents[1] / "standins")


def _drop_vllm_modules():
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def standin(monkeypatch):
    """Imports of vllm get the stand-in for this test, whether or not a real vLLM is installed."""
    _drop_vllm_modules()
    monkeypatch.syspath_prepend(STANDINS)
    yield importlib.import_module("vllm")
    _drop_vllm_modules()


class ListFeed:
    def __init__(self, works):
        self.works = list(works)

    def get(self, block):
        return self.works.pop(0) if self.works else END


def job(tmp_path, **pool):
    raw = {"name": "v", "input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "out")},
           "workers": [{"engine": "vllm", "model": "org/model", **pool}]}
    return parse_spec(raw, {})[0]


def engine_for(tmp_path, **pool):
    spec = job(tmp_path, **pool)
    return create_engine(spec.workers[0], spec)


def run_units(engine, units: list[list], sampling=Sampling(max_tokens=16), chat=False):
    works = []
    for i, prompts in enumerate(units):
        unit = Unit(f"u{i}", "f", 0, len(prompts), (0,), 0)
        works.append(UnitWork(unit, 1, pa.table({"p": [str(p) for p in prompts]}), Rows(prompts, chat=chat)))
    done = []
    BatchLoop(engine, ListFeed(works), done.append, sampling).run()
    return {w.unit.id: w.results for w in done}


def test_engine_args_reach_vllm_unchanged(standin, tmp_path):
    args = {"max_num_seqs": 4, "gpu_memory_utilization": 0.5, "max_model_len": 64, "dtype": "bfloat16",
            "enable_prefix_caching": True}
    engine = engine_for(tmp_path, engine_args=args)
    got = engine.engine.args
    assert {k: getattr(got, k) for k in args} == args and got.model == "org/model"
    assert got.disable_log_stats is True and got.distributed_executor_backend is None
    assert engine.engine.usage_context == standin.LLMEngine.__init__.__globals__["UsageContext"].LLM_CLASS
    assert engine.capacity == 8 and engine.max_model_len == 64


def test_tensor_parallel_uses_vllm_ray_executor(standin, tmp_path):
    engine = engine_for(tmp_path, engine_args={"tensor_parallel_size": 2})
    assert engine.engine.args.distributed_executor_backend == "ray"


def test_an_engine_arg_vllm_does_not_know_is_one_clear_error(standin, tmp_path):
    with pytest.raises(EngineError, match=r"engine_args of the vllm pool for org/model: not an argument .*max_num_seq"):
        engine_for(tmp_path, engine_args={"max_num_seq": 4})


def test_a_model_vllm_cannot_load_is_one_clear_error(standin, tmp_path):
    spec = parse_spec({"name": "v", "input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "o")},
                       "workers": [{"engine": "vllm", "model": "org/missing-model"}]}, {})[0]
    with pytest.raises(EngineError, match="vLLM could not start org/missing-model"):
        create_engine(spec.workers[0], spec)


def test_keeps_max_num_seqs_running_across_unit_boundaries(standin, tmp_path):
    engine = engine_for(tmp_path, engine_args={"max_num_seqs": 4})
    units = [[" ".join(f"w{u}{r}{k}" for k in range(1 + (u + r) % 5)) for r in range(3)] for u in range(8)]
    results = run_units(engine, units)
    for u, prompts in enumerate(units):
        assert [c.text for c in results[f"u{u}"]] == prompts  # the stand-in echoes the prompt's words
        assert all(c.finish_reason == "stop" and c.completion_tokens == len(p.split())
                   for c, p in zip(results[f"u{u}"], prompts))
    history = engine.engine.history  # (running, waiting) at each step
    # Every step until vLLM's own queue drains runs a full batch of 4, though no unit holds 4 rows.
    assert all(r == 4 for r, w in history if w > 0) and sum(w > 0 for _, w in history) >= 5, history


def test_rows_vllm_refuses_fail_alone(standin, tmp_path):
    engine = engine_for(tmp_path, engine_args={"max_model_len": 6})
    results = run_units(engine, [["one two", "a b c d e f g h", "three"]])["u0"]
    assert [c.text for c in results] == ["one two", None, "three"]
    assert results[1].error.startswith("prompt_too_long: This model's maximum context length is 6 tokens")


def test_sampling_reaches_vllm_per_row(standin, tmp_path):
    engine = engine_for(tmp_path)
    row = Sampling(max_tokens=2, temperature=0.5, top_k=0, top_p=0.9, min_p=0.1, repeat_penalty=1.2,
                   presence_penalty=0.5, frequency_penalty=0.25, seed=7, stop=["zz"])
    bad = Sampling(temperature=3.0)  # valid for the runner's spec, above what vLLM takes
    works = [UnitWork(Unit("u0", "f", 0, 3, (0,), 0), 1, pa.table({"p": ["a"] * 3}),
                      Rows(["a b c", "x zz y", "q"], samplings=[row, Sampling(stop=["zz"]), bad]))]
    done = []
    BatchLoop(engine, ListFeed(works), done.append, Sampling()).run()
    results = done[0].results
    assert results[0].text == "a b" and results[0].finish_reason == "length"
    assert results[1].text == "x" and results[1].finish_reason == "stop"
    assert results[2].error.startswith("bad_sampling: temperature must be in [0, 2]")
    params = {rid: p for rid, _, p in engine.engine.added}
    p = next(iter(params.values()))
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
            p.frequency_penalty, p.seed, p.stop) == (2, 0.5, 0, 0.9, 0.1, 1.2, 0.5, 0.25, 7, ["zz"])
    assert all(p.output_kind == 2 for p in params.values())  # FINAL_ONLY: a step returns finished rows only


def test_chat_rows_use_the_tokenizer_template_without_a_second_bos(standin, tmp_path):
    engine = engine_for(tmp_path)
    chat = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]]
    results = run_units(engine, [chat], chat=True)["u0"]
    assert results[0].text == "be brief hello there"
    _, tokens, _ = engine.engine.added[0]
    assert tokens[:2] == ["<s>", "<|system|>"] and tokens[-1] == "<|assistant|>"


def test_chat_rows_without_a_template_fail_alone(standin, tmp_path):
    spec = parse_spec({"name": "v", "input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "o")},
                       "workers": [{"engine": "vllm", "model": "org/no-template"}]}, {})[0]
    engine = create_engine(spec.workers[0], spec)
    results = run_units(engine, [[[{"role": "user", "content": "hi"}]]], chat=True)["u0"]
    assert results[0].error.startswith("no_chat_template: Cannot use chat template functions")


def test_abort_and_close(standin, tmp_path):
    engine = engine_for(tmp_path)
    engine.add(Request(1, "a b", Sampling()))
    engine.add(Request(2, "c d", Sampling()))
    engine.abort(1)
    done = []
    while engine.has_unfinished():
        done += engine.step()
    assert [c.request_id for c in done] == [2]
    engine.close()
    assert engine.engine.engine_core.closed


def test_without_vllm_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    _drop_vllm_modules()
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm fails as if it were not installed
    with pytest.raises(EngineError, match=r"cannot import vllm .*pip install 'runner\[vllm\]'"):
        engine_for(tmp_path)


def _real_vllm_with_gpu() -> bool:
    try:
        import torch
        import vllm
    except ImportError:
        return False
    return not getattr(vllm, "STANDIN", False) and torch.cuda.is_available()


@pytest.mark.skipif(not os.environ.get("RUNNER_VLLM_MODEL") or not _real_vllm_with_gpu(),
                    reason="needs vllm, a GPU and RUNNER_VLLM_MODEL (a local model directory)")
def test_real_vllm_matches_llm_generate(tmp_path):
    """Greedy rows through the engine protocol equal vllm.LLM.generate on the same prompts."""
    import vllm

    model = os.environ["RUNNER_VLLM_MODEL"]
    prompts = [f"Count from {i} to {i + 5}:" for i in range(40)] + ["word " * 5000]
    args = {"max_num_seqs": 8, "max_model_len": 512, "gpu_memory_utilization": 0.3, "enforce_eager": True}
    spec = parse_spec({"name": "v", "input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "o")},
                       "workers": [{"engine": "vllm", "model": model, "engine_args": args}]}, {})[0]
    engine = create_engine(spec.workers[0], spec)
    try:
        results = run_units(engine, [prompts[i:i + 7] for i in range(0, len(prompts), 7)],
                            Sampling(max_tokens=24))
    finally:
        engine.close()
    ours = [c for u in sorted(results, key=lambda k: int(k[1:])) for c in results[u]]
    assert ours[-1].error.startswith("prompt_too_long")
    llm = vllm.LLM(model, **args)
    try:
        base = llm.generate(prompts[:-1], vllm.SamplingParams(max_tokens=24, temperature=0.0))
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert [c.text for c in ours[:-1]] == [o.outputs[0].text for o in base]
