"""JSONL input (`format: jsonl`): line-range units, rows from the keys the job names with one type per copied
column, every bad line a row error; and one job end to end on a real local Ray with the echo engine."""

import json
import typing

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from runner.cluster.ray import RunOptions
from runner.errors import SpecError
from runner.inputs import jsonl
from runner.inputs.formats import FORMATS
from runner.inputs.lines import keep_indexes
from runner.inputs.plan import make_plan
from runner.inputs.reader import open_reader
from runner.job import run_job
from runner.spec.job import FORMAT_KEYS, InputSpec, parse_spec
from runner.storage.location import Location


def write_lines(path, lines, end="\n"):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + end for ln in lines))
    return path


def spec_of(path, out=None, unit_rows=4, **inp):
    raw = {"name": "j", "input": {"format": "jsonl", "path": str(path), **inp},
           "output": {"path": str(out or path.parent / "out")}, "sampling": {"max_tokens": 16},
           "workers": [{"engine": "echo", "num_cpus": 0.5}], "unit_rows": unit_rows}
    return parse_spec(raw, {})


def read_all(spec):
    plan = make_plan(spec)
    reader = open_reader(spec)
    return plan, [reader.read(u, 1) for u in plan.units]


def test_units_are_line_ranges_and_each_bad_line_is_its_own_row_error(tmp_path):
    lines = [{"id": 0, "prompt": "first words", "tag": "a"},
             "{not json",
             {"id": 2, "text": "no prompt key"},
             {"id": 3, "prompt": 42},
             "",  # a blank line before the last: a row
             [1, 2],
             {"id": 6, "prompt": None},
             {"id": 7, "prompt": "last words", "tag": "b"}]
    path = write_lines(tmp_path / "in.jsonl", lines, end="\r\n")
    path.write_bytes(path.read_bytes() + b"\n \n")  # trailing blank lines are not rows
    spec, _ = spec_of(path, id_column="id", columns=["tag"], unit_rows=3)
    plan, works = read_all(spec)
    assert plan.total_rows == 8 and [(u.row_start, u.num_rows) for u in plan.units] == [(0, 3), (3, 3), (6, 2)]
    data = path.read_bytes()
    for u in plan.units:  # whole lines, tiling the file up to its last row
        start, end = u.byte_range
        assert (start == 0 or data[start - 1:start] == b"\n") and data[end - 1:end] == b"\n"
    bad = {w.unit.row_start + r: e for w in works for r, e in w.rows.bad.items()}
    assert {r: e.split(":")[0] for r, e in bad.items()} == {1: "bad_json", 2: "missing_column", 3: "bad_type",
                                                            4: "bad_line", 5: "bad_line"}
    assert bad[2] == "missing_column: line 3 has no 'prompt'" and bad[4] == "bad_line: line 5 is empty"
    prompts = [p for w in works for p in w.rows.prompts]
    assert (prompts[0], prompts[6], prompts[7]) == ("first words", None, "last words")  # null: null_prompt later
    inputs = pa.concat_tables([w.inputs for w in works])
    assert inputs.schema == pa.schema([("id", pa.int64()), ("tag", pa.string())])  # every unit one schema
    assert inputs.column("id").to_pylist() == [0, None, 2, 3, None, None, 6, 7]
    assert inputs.column("tag").to_pylist() == ["a"] + [None] * 6 + ["b"]


def test_a_copied_column_has_one_type_across_files(tmp_path):
    (tmp_path / "in").mkdir()
    write_lines(tmp_path / "in" / "a.jsonl", [{"prompt": "x", "n": 1, "m": "s", "z": None, "b": True}] * 3)
    write_lines(tmp_path / "in" / "b.jsonl", [{"prompt": "y", "n": 2.5, "m": {"k": [1]}, "b": False},
                                              {"prompt": "y", "n": None, "m": 7, "b": None}])
    (tmp_path / "in" / "notes.txt").write_text("not an input file")
    spec, _ = spec_of(tmp_path / "in", out=tmp_path / "out", id_column="n", columns=["m", "z", "b"], unit_rows=2)
    plan, works = read_all(spec)
    assert len(plan.files) == 2 and plan.total_rows == 5
    assert plan.units[0].column_types == (("n", "double"), ("m", "json"), ("z", "null"), ("b", "bool"))
    assert {w.inputs.schema for w in works} == {pa.schema([("n", pa.float64()), ("m", pa.string()),
                                                           ("z", pa.null()), ("b", pa.bool_())])}
    last = works[-1].inputs.to_pylist()
    assert last == [{"n": 2.5, "m": '{"k": [1]}', "z": None, "b": False}, {"n": None, "m": "7", "z": None,
                                                                            "b": None}]


def test_chat_rows_and_per_row_sampling(tmp_path):
    chat = [{"role": "user", "content": "hello"}]
    lines = [{"messages": chat, "sampling": {"max_tokens": 2}},
             {"messages": json.dumps(chat), "sampling": json.dumps({"temperature": 0.5})},
             {"messages": "not a chat"},
             {"messages": chat, "sampling": {"max_tokens": -1}},
             {"messages": [{"role": "user"}]},
             {"messages": chat, "sampling": 3}]
    spec, _ = spec_of(write_lines(tmp_path / "c.jsonl", lines), messages_column="messages",
                      sampling_column="sampling", unit_rows=10)
    _, (work,) = read_all(spec)
    assert {r: e.split(":")[0] for r, e in work.rows.bad.items()} == {2: "bad_messages", 3: "bad_sampling",
                                                                      4: "bad_messages", 5: "bad_sampling"}
    assert work.rows.prompts[:2] == [chat, chat] and work.inputs.num_rows == 6 and work.inputs.num_columns == 0
    s = work.rows.samplings
    assert (s[0].max_tokens, s[1].temperature, s[1].max_tokens) == (2, 0.5, 16)


def test_a_kept_line_index_plans_again_without_reading_and_serves_only_the_same_columns(tmp_path, monkeypatch):
    path = write_lines(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "id": i} for i in range(7)])
    spec, _ = spec_of(path, id_column="id")
    plan = make_plan(spec)
    assert set(plan.new_indexes) == {str(path)}
    keep_indexes(Location.open(spec.output.path), plan, FORMATS["jsonl"](spec).tagged)

    def read_again(*_):
        raise AssertionError("planned by reading the file again")

    with monkeypatch.context() as m:
        m.setattr(jsonl, "index_lines", read_again)
        again = make_plan(spec)
    assert again.new_indexes == {} and again.units == plan.units  # byte ranges and column types included
    other, _ = spec_of(path, id_column="id", columns=["prompt"])  # other copied columns: other kinds to note
    assert set(make_plan(other).new_indexes) == {str(path)}
    write_lines(path, [{"prompt": f"p{i}", "id": str(i)} for i in range(9)])  # rewritten: size and mtime differ
    changed = make_plan(spec)
    assert set(changed.new_indexes) == {str(path)} and changed.total_rows == 9
    assert changed.units[0].column_types == (("id", "string"),)


def test_jsonl_takes_the_column_keys_and_every_format_name_is_registered(tmp_path):
    spec, _ = spec_of(tmp_path / "a.jsonl", messages_column="m", id_column="i", columns=["c"])
    assert spec.input.row_column == "m" and spec.input.prompt_column is None
    with pytest.raises(SpecError, match="input: give prompt_column or messages_column, not both"):
        spec_of(tmp_path / "a.jsonl", prompt_column="p", messages_column="m")
    parquet, _ = parse_spec({**spec_of(tmp_path / "a.jsonl")[1], "input": {"path": str(tmp_path / "a.jsonl")}}, {})
    assert parquet.fingerprint() != spec_of(tmp_path / "a.jsonl")[0].fingerprint()
    names = set(typing.get_args(InputSpec.model_fields["format"].annotation))
    assert names == set(FORMAT_KEYS) == set(FORMATS)


def test_a_jsonl_job_runs_every_line_once_records_bad_lines_and_resumes_without_redoing(ray_local, tmp_path,
                                                                                       monkeypatch):
    (tmp_path / "in").mkdir()
    a = [{"id": i, "prompt": f"row {i} of a"} for i in range(10)]
    a[3] = "{broken"
    a[6] = {"id": 6, "prompt": ["not", "a", "string"]}
    b = [{"id": 100 + i, "prompt": f"row {i} of b"} for i in range(5)]
    write_lines(tmp_path / "in" / "a.jsonl", a)
    write_lines(tmp_path / "in" / "b.jsonl", b)
    spec, resolved = spec_of(tmp_path / "in", out=tmp_path / "out", id_column="id", unit_rows=4)
    first = run_job(spec, resolved, RunOptions(progress=False, dashboard=False))
    assert first["status"] == "succeeded" and first["rows_total"] == 15 and first["units_this_run"] == 5
    assert first["rows_failed"] == 2 and first["errors"] == {"bad_json": 1, "bad_type": 1}

    rows = ds.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()
    keys = sorted((r["source_file"].rsplit("/", 1)[-1], r["source_row"]) for r in rows)
    assert keys == [("a.jsonl", i) for i in range(10)] + [("b.jsonl", i) for i in range(5)]  # each once
    by_key = {(r["source_file"].rsplit("/", 1)[-1], r["source_row"]): r for r in rows}
    assert by_key[("a.jsonl", 3)]["id"] is None and by_key[("a.jsonl", 3)]["error"].startswith("bad_json: line 4")
    assert by_key[("a.jsonl", 6)]["id"] == 6 and by_key[("a.jsonl", 6)]["error"].startswith("bad_type: line 7")
    assert by_key[("b.jsonl", 2)]["id"] == 102 and by_key[("b.jsonl", 2)]["text"] == "row 2 of b"
    assert all(r["error"] is None and r["text"] for k, r in by_key.items() if k not in {("a.jsonl", 3), ("a.jsonl", 6)})

    def read_again(*_):
        raise AssertionError("the resume read an input file again")

    monkeypatch.setattr(jsonl, "index_lines", read_again)  # the kept line indexes plan the resume
    second = run_job(spec, resolved, RunOptions(progress=False, dashboard=False))
    assert (second["units_this_run"], second["units_skipped"], second["status"]) == (0, 5, "succeeded")
    assert ds.dataset(tmp_path / "out", format="parquet").to_table().num_rows == 15
