import json

import pyarrow as pa

from runner.inputs.rows import decode_messages, decode_sampling, read_rows, row_error
from runner.spec.job import parse_spec
from runner.spec.sampling import Sampling

BASE = Sampling(max_tokens=16, temperature=0.5)


def spec(**inp):
    raw = {"name": "j", "input": {"path": "in/", **inp}, "output": {"path": "out/"},
           "sampling": BASE.model_dump(), "workers": [{"engine": "echo"}]}
    return parse_spec(raw, {})[0]


def test_struct_overrides_lay_over_the_job_sampling_and_nulls_are_unset():
    col = pa.chunked_array([pa.array([{"temperature": 0.0, "max_tokens": None}, None,
                                      {"temperature": None, "max_tokens": 3}])])
    bad = {}
    out = decode_sampling(col, BASE, bad)
    assert not bad
    assert (out[0].temperature, out[0].max_tokens) == (0.0, 16)
    assert out[1] is BASE
    assert (out[2].temperature, out[2].max_tokens) == (0.5, 3)


def test_json_overrides_and_their_row_errors():
    rows = [json.dumps({"seed": 9, "stop": ["\n"]}), "", None, "{not json", json.dumps({"temperature": "hot"}),
            json.dumps({"tempreature": 1}), json.dumps([1, 2]), json.dumps({"seed": 9, "stop": ["\n"]})]
    bad = {}
    out = decode_sampling(pa.chunked_array([pa.array(rows)]), BASE, bad)
    assert (out[0].seed, out[0].stop) == (9, ["\n"]) and out[7] == out[0]
    assert out[1] is BASE and out[2] is BASE
    assert sorted(bad) == [3, 4, 5, 6]
    assert bad[3].startswith("bad_sampling: not valid JSON")
    assert bad[4] == 'bad_sampling: temperature: expected a number, got "hot"'
    assert bad[5] == "bad_sampling: tempreature: unknown key"
    assert bad[6].startswith("bad_sampling: expected an object of sampling keys")


def test_messages_from_a_list_column_and_from_json():
    typ = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    col = pa.chunked_array([pa.array([[{"role": "user", "content": "hi"}], None, []], typ)])
    bad = {}
    assert decode_messages(col, bad) == [[{"role": "user", "content": "hi"}], None, []] and not bad
    js = pa.chunked_array([pa.array([json.dumps([{"role": "user", "content": "yo", "name": "x"}]), "[{",
                                     json.dumps([{"role": "user"}]), json.dumps({"role": "user"})])])
    out = decode_messages(js, bad)
    assert out[0] == [{"role": "user", "content": "yo"}]
    assert sorted(bad) == [1, 2, 3] and all(e.startswith("bad_messages: ") for e in bad.values())
    assert "message 0" in bad[2]


def test_row_errors_before_the_engine():
    assert row_error(None).startswith("null_prompt")
    assert row_error(" ").startswith("empty_prompt") and row_error([]).startswith("empty_prompt")
    assert row_error("x") is None and row_error([{"role": "user", "content": "x"}]) is None


def test_read_rows_picks_the_source_column():
    table = pa.table({"m": [json.dumps([{"role": "user", "content": "a"}])], "s": ['{"max_tokens": 2}'],
                      "prompt": ["ignored"]})
    rows = read_rows(table, spec(messages_column="m", sampling_column="s"))
    assert rows.prompts == [[{"role": "user", "content": "a"}]]
    assert rows.samplings[0].max_tokens == 2 and rows.samplings[0].temperature == 0.5
    plain = read_rows(table, spec())
    assert plain.prompts == ["ignored"] and plain.samplings is None
