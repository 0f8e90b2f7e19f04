"""OpenAI batch jobs end to end on a real local Ray, exported as the OpenAI Batch API's result files, which the
official `openai` package's response models parse. The llama.cpp job runs the generated GGUF."""

import json
from collections import Counter

import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner
from conftest import write_shard
from openai.types import Batch, Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from runner.cli import main
from runner.cluster.ray import RunOptions
from runner.inputs import openai_batch as batchfile
from runner.job import run_job
from runner.spec.job import parse_spec

OPTIONS = RunOptions(progress=False, dashboard=False)
BODIES = {"/v1/chat/completions": ChatCompletion, "/v1/completions": Completion,
          "/v1/embeddings": CreateEmbeddingResponse}
LABEL = {"type": "json_schema", "json_schema": {"name": "label", "schema": {
    "type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]}}, "required": ["sentiment"]}}}


def request(i: int) -> dict:
    """A mix of chat and completion requests, some asking for a schema, n samples or logprobs."""
    if i % 5 == 4:
        return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                "body": {"model": "gpt-4o-mini", "prompt": f"Story {i}:", "max_tokens": 6, "logprobs": 2}}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Label review {i}"}], "max_tokens": 8}
    if i % 5 == 1:
        body.update(response_format=LABEL, max_tokens=64)
    if i % 5 == 2:
        body.update(n=2, temperature=0.9, seed=i)
    if i % 5 == 3:
        body.update(logprobs=True, top_logprobs=3)
    return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


BAD = ["{not json", json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),
       json.dumps(request(0)),  # r0 again
       json.dumps({**request(7), "custom_id": "wrong-url", "url": "/v1/responses"}),
       json.dumps({**request(8), "custom_id": "tools",
                   "body": {**request(8)["body"], "tools": [{"type": "function"}]}}),
       json.dumps({**request(9), "custom_id": "hot", "body": {**request(9)["body"], "temperature": -2}})]


def job(tmp_path, pool: dict, name="batch", unit_rows=8, task="generate") -> dict:
    return {"name": name, "task": task, "input": {"format": "openai_batch", "path": str(tmp_path / "in")},
            "output": {"path": str(tmp_path / "out")}, "sampling": {"max_tokens": 16}, "workers": [pool],
            "unit_rows": unit_rows}


def submit(raw: dict, overwrite=False) -> dict:
    spec, resolved = parse_spec(raw, {})
    return run_job(spec, resolved, RunOptions(progress=False, dashboard=False, overwrite=overwrite))


def export(tmp_path, target) -> tuple[list[dict], list[dict], dict]:
    dest = tmp_path / "files"
    result = CliRunner().invoke(main, ["export", str(target), "--format", "openai-batch", "--to", str(dest)])
    assert result.exit_code == 0, result.output
    read = lambda name: [json.loads(ln) for ln in (dest / name).read_text().splitlines()]  # noqa: E731
    return read("output.jsonl"), read("errors.jsonl"), json.loads((dest / "batch.json").read_text())


def test_an_openai_batch_job_exports_result_files_the_openai_package_parses(tiny_model, ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    lines = [json.dumps(request(i)) for i in range(40)]
    lines[13:13] = BAD  # bad lines in the middle of a unit
    (tmp_path / "in" / "requests.jsonl").write_text("\n".join(lines) + "\n")
    pool = {"engine": "llamacpp", "model": tiny_model, "replicas": 2, "num_cpus": 1, "n_ctx": 256, "parallel": 8}
    m = submit(job(tmp_path, pool))
    assert m["request_counts"] == {"total": 46, "completed": m["rows_ok"], "failed": m["rows_failed"]}
    assert m["rows_failed"] >= 6

    out, errors, batch = export(tmp_path, tmp_path / "out")
    ids = Counter(line["custom_id"] for line in out + errors)
    assert all(ids[f"r{i}"] == 1 for i in range(40) if i != 0)  # every request once across the two files
    assert ids["r0"] == 2 and ids[None] == 2  # r0 and its repeat; the two lines without a custom_id
    codes = Counter(e["error"]["code"] for e in errors)
    assert {"bad_json", "missing_custom_id", "duplicate_custom_id", "wrong_url", "unsupported_parameter",
            "bad_sampling"} <= set(codes)
    assert next(e for e in errors if e["error"]["code"] == "duplicate_custom_id")["custom_id"] == "r0"
    assert all(e["response"] is None and e["error"]["message"] for e in errors)

    table = ds.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    by_id = {r["custom_id"]: r for r in table if r["error"] is None}
    assert {line["custom_id"] for line in out} == set(by_id)
    for line in out:
        row, response = by_id[line["custom_id"]], line["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        body = BODIES[row["url"]].model_validate(response["body"])  # the official models parse each body
        first = body.choices[0]
        assert (first.message.content if row["url"] == "/v1/chat/completions" else first.text) == row["text"]
        generated = sum(c["completion_tokens"] for c in row["choices"]) if row["choices"] else row["completion_tokens"]
        assert body.usage.prompt_tokens == row["prompt_tokens"] and body.usage.completion_tokens == generated
        i = int(line["custom_id"][1:])
        if i % 5 == 1:
            assert json.loads(first.message.content)["sentiment"] in ("positive", "negative")
        assert len(body.choices) == (2 if i % 5 == 2 else 1)
        if i % 5 == 3:
            assert len(first.logprobs.content) == row["completion_tokens"]
            assert all(len(t.top_logprobs) == 3 for t in first.logprobs.content)
        if i % 5 == 4:
            assert len(first.logprobs.tokens) == row["completion_tokens"] and len(first.logprobs.top_logprobs[0]) == 2
    b = Batch.model_validate(batch)
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (46, len(out), len(errors))
    assert b.status == "completed" and b.endpoint == "/v1/chat/completions"
    assert b.usage.output_tokens == m["completion_tokens"]


def echo_requests(tmp_path, n: int, url="/v1/completions"):
    (tmp_path / "in").mkdir(exist_ok=True)
    key = "input" if url == "/v1/embeddings" else "prompt"
    (tmp_path / "in" / "r.jsonl").write_text("".join(
        json.dumps({"custom_id": f"e{i}", "method": "POST", "url": url, "body": {key: f"words of row {i}"}}) + "\n"
        for i in range(n)))


def test_a_resumed_batch_job_runs_only_what_is_missing_and_exports_each_request_once(ray_local, tmp_path,
                                                                                     monkeypatch):
    echo_requests(tmp_path, 20)
    raw = job(tmp_path, {"engine": "echo"}, unit_rows=3)
    raw["output"]["target_file_mb"] = 0  # a file a unit: one unit's marker and rows can be taken away
    first = submit(raw)
    out_before, _, _ = export(tmp_path, tmp_path / "out")
    for name in ("_commits/part-00000-0000000006.json", "part-00000-0000000006.parquet"):
        (tmp_path / "out" / name).unlink()  # as if the run died before this unit committed
    (tmp_path / "out" / "_SUCCESS").unlink()
    assert len(list((tmp_path / "out" / "_inputs").glob("*.arrow"))) == 1

    def read_again(*_):
        raise AssertionError("the resume read the request file again")

    monkeypatch.setattr(batchfile, "index_lines", read_again)  # the kept line index plans the resume
    second = submit(raw)
    assert (first["units_this_run"], second["units_this_run"], second["units_skipped"]) == (7, 1, 6)
    out, errors, batch = export(tmp_path, tmp_path / "out")
    assert [line["custom_id"] for line in out] == [f"e{i}" for i in range(20)] and errors == []
    # ids derive from the job and the row, so the lines are the same; only the re-run unit's time is later
    for i in range(6, 9):  # the re-run unit's rows
        assert out[i]["response"]["body"].pop("created") >= out_before[i]["response"]["body"].pop("created")
    assert out == out_before
    assert batch["request_counts"] == {"total": 20, "completed": 20, "failed": 0}


def test_an_embedding_batch_exports_embedding_lists(ray_local, tmp_path):
    echo_requests(tmp_path, 6, url="/v1/embeddings")
    m = submit(job(tmp_path, {"engine": "echo", "engine_args": {"dim": 16}}, task="embed"))
    assert m["request_counts"]["completed"] == 6
    out, errors, batch = export(tmp_path, tmp_path / "out")
    bodies = [CreateEmbeddingResponse.model_validate(line["response"]["body"]) for line in out]
    assert len(bodies) == 6 and errors == [] and batch["endpoint"] == "/v1/embeddings"
    assert all(len(b.data[0].embedding) == 16 and b.usage.prompt_tokens > 0 for b in bodies)


def test_a_parquet_job_exports_with_its_id_column_as_custom_id(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.parquet", ["alpha beta", "", "gamma"], ids=[7, 8, 9])
    raw = {"name": "pq", "input": {"path": str(tmp_path / "in"), "id_column": "id"},
           "output": {"path": str(tmp_path / "out")}, "workers": [{"engine": "echo"}]}
    submit(raw)
    out, errors, _ = export(tmp_path, tmp_path / "out")
    assert [line["custom_id"] for line in out] == ["7", "9"]
    assert errors == [{"id": errors[0]["id"], "custom_id": "8", "response": None,
                       "error": {"code": "empty_prompt", "message": "prompt is empty"}}]
    assert Completion.model_validate(out[0]["response"]["body"]).choices[0].text == "alpha beta"


def test_exporting_a_location_without_a_job_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path), "--to", str(tmp_path / "files")])
    assert result.exit_code == 3 and result.output == f"error: {tmp_path}: holds no runner job (no _job.json)\n"


@pytest.fixture(autouse=True)
def _no_leftover_ray_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
