"""`runner plan`: token counts against the tokenizers' and engines' own, a sampled estimate against the truth,
and the calibrated ETA against a real job's wall time."""

import json
import random

import pytest
from click.testing import CliRunner
from conftest import run_all, write_job, write_shard

from runner.cli import main
from runner.cluster.ray import RunOptions
from runner.estimate.estimate import estimate
from runner.job import run_job
from runner.spec.job import load_spec
from runner.tinymodel import write_tiny_model

WORDS = "the price was good and I would buy it again but the screen sound battery delivery quality".split()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> str:
    """The tiny llama as a Hugging Face directory: conftest's tiny_hf_model without its `import vllm`, which
    counting tokens does not need."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-hf")


def job(tmp_path, pools: list[dict], inp: dict | None = None, **top) -> str:
    body = {"name": "plan-job", "input": {"path": str(tmp_path / "in"), **(inp or {})},
            "output": {"path": str(tmp_path / "out")}, **top, "workers": pools}
    return str(write_job(tmp_path / "job.yaml", "".join(f"{k}: {json.dumps(v)}\n" for k, v in body.items())))


def llama(model, **over) -> dict:
    return {"engine": "llamacpp", "name": "cpu", "model": model, "n_ctx": 256, "parallel": 8, **over}


def sentences(n: int, seed: int = 0, long_every: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(60, 90) if long_every and i % long_every == 0
                                 else rng.randint(2, 14))) for i in range(n)]


def engine_prompt_tokens(model: str, n_ctx: int, requests) -> dict:
    """{request id: Completion} from the real llama.cpp engine, one token each."""
    from runner.engines.llamacpp.generate import LlamaCppEngine

    engine = LlamaCppEngine(model, n_ctx=n_ctx, parallel=8)
    try:
        return run_all(engine, requests)
    finally:
        engine.close()


def test_small_job_counts_exactly_what_the_llama_engine_counts(tmp_path, tiny_model):
    from runner.engines.base import Request
    from runner.spec.sampling import Sampling

    (tmp_path / "in").mkdir()
    prompts = sentences(150, seed=1)
    write_shard(tmp_path / "in" / "a.parquet", prompts[:100], row_group_size=10)
    write_shard(tmp_path / "in" / "b.parquet", prompts[100:] + [None, ""])
    spec, _ = load_spec(job(tmp_path, [llama(tiny_model)], unit_rows=10, sampling={"max_tokens": 7}))
    est = estimate(spec)
    done = engine_prompt_tokens(tiny_model, 256, [Request(i, p, Sampling(max_tokens=1)) for i, p in enumerate(prompts)])
    truth = [done[i].prompt_tokens for i in range(len(prompts))]
    pool = est.pools[0]
    assert est.exact and est.rows == est.rows_sampled == 152 and est.rows_bad == 2
    assert (pool.prompt_tokens.total, pool.prompt_tokens.max) == (sum(truth), max(truth))
    assert pool.prompt_tokens.mean == round(sum(truth) / 150, 2)
    assert est.max_generated_tokens == pool.max_generated_tokens == 150 * 7
    assert (pool.context, pool.rows_prompt_over_context, pool.rows_output_over_context) == (256, 0, 0)


def test_chat_rows_count_the_rendered_template_as_the_engine_does(tmp_path, tiny_model):
    from runner.engines.base import Request

    (tmp_path / "in").mkdir()
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in sentences(40)]
    write_shard(tmp_path / "in" / "a.parquet", [None] * 40, messages=[json.dumps(c) for c in chats])
    spec, _ = load_spec(job(tmp_path, [llama(tiny_model)], {"messages_column": "messages"}))
    done = engine_prompt_tokens(tiny_model, 256, [Request(i, None, messages=c) for i, c in enumerate(chats)])
    assert estimate(spec).pools[0].prompt_tokens.total == sum(c.prompt_tokens for c in done.values())


def test_vllm_pool_counts_with_the_models_own_tokenizer(tmp_path, hf_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_model, local_files_only=True)
    (tmp_path / "in").mkdir()
    prompts = sentences(60, seed=2)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    write_shard(tmp_path / "in" / "a.parquet", prompts, messages=[json.dumps(c) for c in chats])
    pool = {"engine": "vllm", "name": "gpu", "model": hf_model}
    text = estimate(load_spec(job(tmp_path, [pool]))[0]).pools[0]
    assert text.prompt_tokens.total == sum(len(tok.encode(p)) for p in prompts)
    assert (text.context, text.context_from) == (4096, "config.json max_position_embeddings")
    short = {**pool, "engine_args": {"max_model_len": 20}}
    chat = estimate(load_spec(job(tmp_path, [short], {"messages_column": "messages"}))[0]).pools[0]
    counts = [len(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True)["input_ids"]) for c in chats]
    assert chat.prompt_tokens.total == sum(counts)
    assert chat.context == 20 and chat.rows_prompt_over_context == sum(c >= 20 for c in counts) > 0


def test_rows_over_context_are_the_rows_the_engine_refuses_or_cuts(tmp_path, tiny_model):
    from runner.engines.base import Request
    from runner.spec.sampling import Sampling

    (tmp_path / "in").mkdir()
    prompts = sentences(80, seed=3, long_every=4)  # every 4th prompt is longer than the context
    write_shard(tmp_path / "in" / "a.parquet", prompts)
    spec, _ = load_spec(job(tmp_path, [llama(tiny_model, n_ctx=48)], sampling={"max_tokens": 20}))
    pool = estimate(spec).pools[0]
    done = engine_prompt_tokens(tiny_model, 48, [Request(i, p, Sampling(max_tokens=20)) for i, p in enumerate(prompts)])
    refused = sum(bool(c.error and c.error.startswith("prompt_too_long")) for c in done.values())
    fits = [c.prompt_tokens for c in done.values() if c.error is None]
    assert pool.rows_prompt_over_context == refused >= 20
    assert pool.rows_output_over_context == sum(t + 20 > 48 for t in fits) > 0
    assert pool.max_generated_tokens == sum(min(20, 48 - t) for t in fits) < 60 * 20


def test_per_row_sampling_sets_the_most_tokens_generated(tmp_path, tiny_model):
    (tmp_path / "in").mkdir()
    overrides = [{"max_tokens": 5}, {"max_tokens": 3, "n": 2, "temperature": 0.5}, None, {"max_tokens": 0}]
    write_shard(tmp_path / "in" / "a.parquet", sentences(40), sampling=[json.dumps(o) for o in overrides * 10])
    spec, _ = load_spec(job(tmp_path, [llama(tiny_model), {"engine": "echo", "name": "echo"}],
                            {"sampling_column": "sampling"}, sampling={"max_tokens": 16}))
    est = estimate(spec)
    assert est.rows_bad == 10  # max_tokens 0 is no sampling at all: the row fails, and generates nothing
    assert est.max_generated_tokens == 10 * (5 + 3 * 2 + 16)
    assert [p.max_generated_tokens for p in est.pools] == [est.max_generated_tokens] * 2


def test_a_large_job_is_estimated_from_a_sample_near_the_truth(tmp_path, tiny_model):
    import llama_cpp

    (tmp_path / "in").mkdir()
    prompts = sentences(20_000, seed=4, long_every=10)
    for s in range(4):
        write_shard(tmp_path / "in" / f"{s}.parquet", prompts[s::4], row_group_size=250)
    pools = [llama(tiny_model, n_ctx=64), {"engine": "echo", "name": "echo"}]
    est = estimate(load_spec(job(tmp_path, pools, unit_rows=250, sampling={"max_tokens": 40}))[0])
    vocab = llama_cpp.Llama(tiny_model, vocab_only=True, verbose=False)
    tokens = [len(vocab.tokenize(p.encode(), add_bos=True, special=False)) for p in prompts]
    words = sum(len(p.split()) for p in prompts)
    cpu, echo = est.pools
    assert not est.exact and est.rows == 20_000 and 1500 <= est.rows_sampled <= 2500 and est.units_sampled < 80
    assert cpu.prompt_tokens.total == pytest.approx(sum(tokens), rel=0.05)
    assert echo.prompt_tokens.total == pytest.approx(words, rel=0.05)
    assert cpu.rows_prompt_over_context == pytest.approx(sum(t >= 64 for t in tokens), rel=0.2)
    assert cpu.rows_output_over_context == pytest.approx(sum(t < 64 < t + 40 for t in tokens), rel=0.2)
    assert echo.context is None and echo.max_generated_tokens == est.max_generated_tokens == 20_000 * 40
    table = CliRunner().invoke(main, ["plan", str(tmp_path / "job.yaml")]).output
    assert f"estimated from {est.rows_sampled} of 20000 rows" in table and f"~{cpu.prompt_tokens.total}" in table


def test_json_is_the_estimate_and_user_errors_are_one_line(tmp_path, tiny_model):
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.parquet", sentences(30))
    path = job(tmp_path, [llama(tiny_model, cost_per_hour=0.5)])
    result = CliRunner().invoke(main, ["plan", path, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == estimate(load_spec(path)[0]).model_dump(mode="json")
    assert json.loads(result.output)["pools"][0]["cost_per_hour"] == 0.5
    refused = CliRunner().invoke(main, ["plan", path, "--calibrate", "--address", "http://head:8265"])
    assert refused.exit_code == 2 and refused.output.strip().splitlines() == [
        ("error: --address http://head:8265: runner plan --calibrate joins a cluster by its GCS address "
         "(HEAD:6379), not its dashboard")]
    # a Hugging Face id's refusal: test_tokens_hub.py, with a cache of its own
    missing = CliRunner().invoke(main, ["plan", job(tmp_path, [{"engine": "vllm", "name": "v", "model": "/nowhere"}])])
    assert missing.exit_code == 4 and missing.output == (
        "error: pool v: model /nowhere is not a directory on this machine\n")


def test_cost_per_hour_changes_no_output(tmp_path, tiny_model):
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.parquet", ["a prompt"])
    priced = load_spec(job(tmp_path, [llama(tiny_model, cost_per_hour=3.0)]))[0]
    assert priced.fingerprint() == load_spec(job(tmp_path, [llama(tiny_model)]))[0].fingerprint()


def test_calibrated_eta_is_within_2x_of_the_real_jobs_wall_time(tmp_path, tiny_model, ray_local):
    """Both in this process, on the test's Ray: neither starts Ray, and the job's wall_time_s covers the rest
    (plan, claim, the replicas' start and load, every unit, the manifest and report)."""
    (tmp_path / "in").mkdir()
    prompts = sentences(24_000, seed=5)
    for s in range(4):
        write_shard(tmp_path / "in" / f"{s}.parquet", prompts[s::4], row_group_size=250)
    path = job(tmp_path, [llama(tiny_model, replicas=2, num_cpus=1, cost_per_hour=2.0)], unit_rows=250,
               sampling={"max_tokens": 16})
    result = CliRunner().invoke(main, ["plan", path, "--calibrate", "--json"])
    assert result.exit_code == 0, result.output
    est = json.loads(result.output)
    cal, eta = est["pools"][0]["calibration"], est["eta"]
    assert cal["rows"] >= 4 * 8 and cal["rows_per_s"] > 0 and 0 < cal["mean_completion_tokens"] <= 16
    assert cal["replica_start_s"] > cal["model_load_s"] > 0
    assert eta["ray_start_s"] == 0  # the test's Ray was already connected
    assert eta["rows_per_s"] == pytest.approx(2 * cal["rows_per_s"], rel=0.01)
    assert eta["cost"] == pytest.approx(2 * 2.0 * eta["total_s"] / 3600, rel=1e-3)
    manifest = run_job(*load_spec(path), RunOptions(progress=False))
    print(f"ETA {eta['total_s']:.1f}s ({eta}), real wall time {manifest['wall_time_s']:.1f}s")
    assert manifest["rows_ok"] == 24_000
    assert manifest["wall_time_s"] / 2 <= eta["total_s"] <= manifest["wall_time_s"] * 2


def test_a_calibration_piece_keeps_each_rows_prompt_sampling_and_error(tmp_path):
    import pyarrow as pa

    from runner.estimate.calibrate import split_work
    from runner.inputs.rows import Rows
    from runner.inputs.units import Unit, UnitWork
    from runner.spec.sampling import Sampling

    prompts = [f"row {i}" for i in range(10)]
    samplings = [Sampling(max_tokens=i + 1) for i in range(10)]
    work = UnitWork(Unit("u", "f", 0, 10, (0,), 0), 0, pa.table({"i": list(range(10))}),
                    Rows(prompts, samplings, {2: "bad_sampling: x", 7: "null_prompt: y"}))
    pieces = split_work(work, 4)
    assert [p.rows.prompts for p in pieces] == [prompts[:4], prompts[4:8], prompts[8:]]
    assert [p.rows.bad for p in pieces] == [{2: "bad_sampling: x"}, {3: "null_prompt: y"}, {}]
    assert pieces[2].rows.samplings == samplings[8:] and pieces[1].inputs.column("i").to_pylist() == [4, 5, 6, 7]
    assert [p.remaining for p in pieces] == [4, 4, 2]


def test_a_calibration_fills_a_large_engine_from_more_of_the_job_than_the_drivers_sample(tmp_path, ray_local):
    """An engine holding 1024 rows at once (a GPU vLLM holds 2048) needs 4 x 1024 rows for a steady rate:
    more than the driver's 2000-row sample, so the replica reads more of the job; a job with fewer rows
    runs them all."""
    from runner.estimate.calibrate import CALIBRATE_FILLS

    big, small = tmp_path / "big", tmp_path / "small"
    for where, rows in ((big, 12_000), (small, 3_000)):
        (where / "in").mkdir(parents=True)
        write_shard(where / "in" / "a.parquet", sentences(rows, seed=6), row_group_size=250)
    echo = {"engine": "echo", "name": "echo", "parallel": 1024}
    est = estimate(load_spec(job(big, [echo], unit_rows=250))[0], calibrate=True)
    cal = est.pools[0].calibration
    assert cal.capacity == 1024 and est.rows_sampled < CALIBRATE_FILLS * 1024 <= cal.rows < 12_000
    assert cal.rows_failed == 0 and cal.rows_per_s > 0
    whole = estimate(load_spec(job(small, [echo], unit_rows=250))[0], calibrate=True)
    assert whole.pools[0].calibration.rows == 3_000


def test_the_rows_a_replica_reads_beyond_the_sample_are_spread_over_the_job_and_read_once(tmp_path):
    import time

    from runner.estimate.calibrate import read_more
    from runner.estimate.estimate import SAMPLE_ROWS, read_sample
    from runner.inputs.plan import make_plan

    (tmp_path / "in").mkdir()
    for s in range(4):
        write_shard(tmp_path / "in" / f"{s}.parquet", sentences(5_000, seed=s), row_group_size=100)
    spec = load_spec(job(tmp_path, [{"engine": "echo", "name": "echo"}], unit_rows=100))[0]
    plan = make_plan(spec)
    sample = read_sample(spec, plan)
    assert sample.rows <= SAMPLE_ROWS < 8_000
    works = read_more(spec, sample.works, plan.units, 8_000, time.time() + 60)
    ids = [w.unit.id for w in works]
    order = {u.id: i for i, u in enumerate(plan.units)}
    assert ids[:len(sample.works)] == [w.unit.id for w in sample.works] and len(set(ids)) == len(ids)
    assert 8_000 <= sum(len(w.rows.prompts) for w in works) < 8_000 + 100
    added = sorted(order[i] for i in ids[len(sample.works):])
    assert added[0] < len(plan.units) / 8 and added[-1] > len(plan.units) * 7 / 8  # the whole job, not its start
    assert read_more(spec, sample.works, plan.units, 8_000, time.time() - 1) == sample.works  # out of time
