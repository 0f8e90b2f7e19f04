"""OpenAI batch files as input: line-range units by newline offsets, each line's body as its row and sampling,
and every bad line a row error (or one validate line where planning can see it). No engine, no Ray."""

import json

import pytest
from click.testing import CliRunner
from conftest import S3_OPTIONS

from runner.cli import main
from runner.errors import InputError, SpecError
from runner.inputs.openai_batch import BatchFileReader, decode_line, index_lines
from runner.inputs.plan import make_plan
from runner.inputs.reader import open_reader
from runner.spec.job import parse_spec


def chat(cid, text="hi", **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **body}}


def completion(cid, text="once upon", **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"prompt": text, **body}}


def write_lines(path, lines, end="\n"):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + end for ln in lines))
    return path


def spec_of(path, unit_rows=4, task="generate", **inp):
    raw = {"name": "b", "task": task, "input": {"format": "openai_batch", "path": str(path), **inp},
           "output": {"path": str(path.parent / "out")}, "sampling": {"max_tokens": 16},
           "workers": [{"engine": "echo"}], "unit_rows": unit_rows}
    return parse_spec(raw, {})[0]


def read_all(spec):
    plan = make_plan(spec)
    reader = open_reader(spec)
    return plan, [reader.read(u, 1) for u in plan.units]


def test_units_are_line_ranges_and_a_worker_reads_exactly_its_lines(tmp_path):
    lines = [chat(f"c{i}", f"line {i}") for i in range(10)]
    path = write_lines(tmp_path / "req.jsonl", lines, end="\r\n")
    plan, works = read_all(spec_of(path))
    assert plan.total_rows == 10 and [u.num_rows for u in plan.units] == [4, 4, 2]
    assert [u.row_start for u in plan.units] == [0, 4, 8]
    data = path.read_bytes()
    for u in plan.units:  # each range is whole lines, and the ranges tile the file
        start, end = u.byte_range
        assert (start == 0 or data[start - 1:start] == b"\n") and data[end - 1:end] == b"\n"
    assert plan.units[-1].byte_range[1] == len(data)
    got = [(cid, p[0]["content"]) for w in works
           for cid, p in zip(w.inputs.column("custom_id").to_pylist(), w.rows.prompts, strict=True)]
    assert got == [(f"c{i}", f"line {i}") for i in range(10)]


def test_a_last_line_without_newline_counts_and_trailing_blank_lines_do_not(tmp_path):
    path = tmp_path / "req.jsonl"
    path.write_text(json.dumps(chat("a")) + "\n" + json.dumps(chat("b")))
    assert index_lines(*_fs(path)).lines == 2
    path.write_text(json.dumps(chat("a")) + "\n\n" + json.dumps(chat("b")) + "\n\n \n")
    plan, (work,) = read_all(spec_of(path))
    assert plan.total_rows == 3  # the blank line between requests is a row: it is line 2
    assert work.rows.bad == {1: "bad_line: line 2 is empty"}


def _fs(path):
    from fsspec.core import url_to_fs
    return url_to_fs(str(path))


def test_every_bad_line_is_its_own_row_error(tmp_path):
    lines = [
        chat("ok-chat", "hello", max_completion_tokens=5, max_tokens=99, stop="END", temperature=0.5, seed=3, n=2),
        "{not json",
        {"method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}},
        chat("again"),  # given the first line's custom_id below
        {"custom_id": "resp", "method": "POST", "url": "/v1/responses", "body": {"input": "x"}},
        {"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}},
        chat("tools", tools=[{"type": "function"}]),
        chat("hot", temperature=-1),
        completion("two-prompts", ["a", "b"]),
        completion("ok-completion", logprobs=3),
        {"custom_id": "parts", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [
            {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "x"}]}},
        {"custom_id": "image", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}},
        chat("emb-in-generate-job"),
    ]
    lines[0]["custom_id"] = "first"
    lines[3]["custom_id"] = "first"
    path = write_lines(tmp_path / "req.jsonl", lines)
    _, works = read_all(spec_of(path, unit_rows=100))
    (work,) = works
    kinds = {r: e.split(":")[0] for r, e in work.rows.bad.items()}
    assert kinds == {1: "bad_json", 2: "missing_custom_id", 3: "duplicate_custom_id", 4: "wrong_url",
                     5: "wrong_method", 6: "unsupported_parameter", 7: "bad_sampling", 8: "bad_body",
                     11: "unsupported_parameter"}
    assert "line 1 of" in work.rows.bad[3]  # says where the custom_id was first
    s = work.rows.samplings
    assert (s[0].max_tokens, s[0].stop, s[0].temperature, s[0].seed, s[0].n) == (5, ["END"], 0.5, 3, 2)
    assert s[9].logprobs == 3 and s[12].max_tokens == 16  # the job's default where a body says nothing
    assert work.rows.prompts[10] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}]
    assert work.rows.prompts[9] == "once upon"
    assert work.inputs.column("custom_id").to_pylist()[:3] == ["first", None, None]
    assert work.inputs.column("url").to_pylist()[9] == "/v1/completions"


def test_a_custom_id_repeated_in_a_later_file_and_unit_is_the_later_rows_error(tmp_path):
    (tmp_path / "in").mkdir()
    write_lines(tmp_path / "in" / "a.jsonl", [chat(f"id{i}") for i in range(6)])
    write_lines(tmp_path / "in" / "b.jsonl", [chat("new"), chat("id4"), chat("new")])
    write_lines(tmp_path / "in" / "notes.txt", ["not a request file"])
    plan, works = read_all(spec_of(tmp_path / "in", unit_rows=4))
    assert len(plan.files) == 2 and plan.total_rows == 9
    bad = {(w.unit.id, r): e for w in works for r, e in w.rows.bad.items()}
    assert set(bad) == {("part-00001-0000000000", 1), ("part-00001-0000000000", 2)}
    assert "line 5 of" in bad[("part-00001-0000000000", 1)] and "a.jsonl" in bad[("part-00001-0000000000", 1)]
    assert "line 1 of" in bad[("part-00001-0000000000", 2)]


def test_chat_logprobs_and_completion_logprobs_map_to_top_k():
    line = json.dumps(chat("a", logprobs=True, top_logprobs=4)).encode()
    assert decode_line(line, 1, "generate").sampling == {"logprobs": 4}
    line = json.dumps(chat("a", logprobs=True)).encode()
    assert decode_line(line, 1, "generate").sampling == {"logprobs": 1}
    line = json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": "m", "input": ["one text"], "encoding_format": "float"}}).encode()
    req = decode_line(line, 1, "embed")
    assert req.prompt == "one text" and req.sampling is None
    assert decode_line(line, 7, "generate").startswith("wrong_url: line 7 asks for '/v1/embeddings'")


def test_a_file_whose_requests_the_task_does_not_answer_is_one_validate_line(tmp_path):
    emb = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    path = write_lines(tmp_path / "req.jsonl", [emb, emb])
    with pytest.raises(InputError, match=r"req.jsonl: its requests ask for /v1/embeddings, which a task generate "
                                         r"job does not answer; set task: embed"):
        make_plan(spec_of(path))
    plan = make_plan(spec_of(path, task="embed"))
    assert plan.total_rows == 2 and plan.units[0].repeats == ((1, f"line 1 of {path}"),)


def test_parquet_keys_with_an_openai_batch_input_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match=r"input: prompt_column is a parquet and jsonl setting; an openai_batch line"):
        spec_of(tmp_path / "r.jsonl", prompt_column="p")
    raw = {"name": "b", "input": {"path": "in/"}, "output": {"path": "out/"}, "workers": [{"engine": "echo"}]}
    plain, explicit = (parse_spec(r, {})[0] for r in (raw, {**raw, "input": {"path": "in/", "format": "parquet"}}))
    # a Parquet job keeps the fingerprint it had before `format` existed
    assert plain.fingerprint() == explicit.fingerprint() != spec_of(tmp_path / "in").fingerprint()


def test_validate_prints_the_plan_and_an_empty_directory_is_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    job = tmp_path / "job.yaml"
    body = {"name": "b", "input": {"format": "openai_batch", "path": str(tmp_path / "in")},
            "output": {"path": str(tmp_path / "out")}, "workers": [{"engine": "echo"}], "unit_rows": 2}
    job.write_text(json.dumps(body))
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code == 3
    assert result.output.strip() == f"error: input.path: no *.jsonl files under {tmp_path / 'in'}"
    write_lines(tmp_path / "in" / "r.jsonl", [chat(f"{i}") for i in range(5)])
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code == 0 and "1 input files, 5 rows, 3 units of up to 2 rows" in result.output


def test_a_request_file_on_s3_is_planned_and_read_by_byte_range(s3_bucket, tmp_path):
    name, fs = s3_bucket
    lines = [completion(f"s{i}", f"prompt {i}") for i in range(7)]
    with fs.open(f"{name}/req/batch.jsonl", "w") as f:
        f.write("".join(json.dumps(ln) + "\n" for ln in lines))
    raw = {"name": "b", "input": {"format": "openai_batch", "path": f"s3://{name}/req/*.jsonl",
                                  "storage_options": S3_OPTIONS},
           "output": {"path": str(tmp_path / "out")}, "workers": [{"engine": "echo"}], "unit_rows": 3}
    import os
    spec = parse_spec(raw, dict(os.environ))[0]
    plan, works = read_all(spec)
    assert plan.files[0].url == f"s3://{name}/req/batch.jsonl" and plan.files[0].version.startswith("etag:")
    assert [p for w in works for p in w.rows.prompts] == [f"prompt {i}" for i in range(7)]
    assert BatchFileReader(spec).read(plan.units[1], 1).inputs.column("custom_id").to_pylist() == ["s3", "s4", "s5"]


def test_a_kept_line_index_serves_only_the_same_file(tmp_path):
    from runner.inputs.lines import keep_indexes
    from runner.storage.location import Location

    path = write_lines(tmp_path / "req.jsonl", [chat(f"k{i}") for i in range(5)] + [chat("k0")])
    spec = spec_of(path, unit_rows=4)
    plan = make_plan(spec)
    assert set(plan.new_indexes) == {str(path)}
    keep_indexes(Location.open(spec.output.path), plan)
    again = make_plan(spec)
    assert again.new_indexes == {} and again.units == plan.units  # repeats and byte ranges included
    write_lines(path, [chat(f"k{i}") for i in range(7)])  # rewritten: another size and modification time
    changed = make_plan(spec)
    assert set(changed.new_indexes) == {str(path)} and changed.total_rows == 7


PLAN_PEAK_RSS = """import json, re, sys
from runner.inputs.plan import make_plan
from runner.spec.job import load_spec
plan = make_plan(load_spec(sys.argv[1])[0])
repeats = {u.row_start + r: where for u in plan.units for r, where in u.repeats}
peak = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
print(json.dumps({"rows": plan.total_rows, "units": len(plan.units), "repeats": repeats, "peak_kb": int(peak)}))"""


def test_five_million_request_lines_plan_in_under_1_gb(tmp_path):
    """A plan of 5,000,000 request lines, three of them repeating an earlier custom_id, in a process of its
    own: the repeats are found, and its peak RSS stays under 1 GB (the index is arrays of a few bytes a line;
    repeats are found by sorting hashes, then reading only the lines whose hashes are equal)."""
    import subprocess
    import sys

    n, repeated = 5_000_000, {1_000_003: 7, 2_500_000: 4_999_999, 4_000_000: 123}
    line = ('{{"custom_id": "request-{}", "method": "POST", "url": "/v1/completions", '
            '"body": {{"prompt": "say something about {}", "max_tokens": 4}}}}\n')
    with open(tmp_path / "big.jsonl", "w") as f:
        for start in range(0, n, 100_000):
            f.write("".join(line.format(repeated.get(i, i), i) for i in range(start, start + 100_000)))
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_of(tmp_path / "big.jsonl", unit_rows=1024).model_dump(mode="json")))
    run = subprocess.run([sys.executable, "-c", PLAN_PEAK_RSS, str(job)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    where = str(tmp_path / "big.jsonl")
    assert out["rows"] == n and out["units"] == -(-n // 1024)
    assert out["repeats"] == {"1000003": f"line 8 of {where}", "4000000": f"line 124 of {where}",
                              "4999999": f"line 2500001 of {where}"}  # the later line of each pair
    print(f"5,000,000 lines planned; peak RSS {out['peak_kb'] / 1024:.0f} MB")
    assert out["peak_kb"] / 1024 < 1024, out["peak_kb"]
