"""runner.spec.schema: a JSON schema's Arrow type, each row's constraint checked, and the `parsed` column as
pyarrow, pandas and DuckDB read it back."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.engines.base import Choice, Completion, TokenLogprob
from runner.engines.constraints import check
from runner.errors import SpecError
from runner.inputs.units import Unit
from runner.output.store import output_table
from runner.spec.job import parse_spec
from runner.spec.sampling import Sampling
from runner.spec.schema import SchemaError, arrow_type, parsed_column

REVIEW = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "score": {"type": "number"},
        "spam": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "author": {"$ref": "#/$defs/person"},
        "note": {"type": ["string", "null"]},
    },
    "required": ["sentiment", "stars"],
    "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}},
}


def json_sampling(schema: dict = REVIEW, **over) -> Sampling:
    return Sampling.model_validate({"response_format": {"type": "json_schema",
                                                        "json_schema": {"name": "review", "schema": schema}}, **over})


def test_schema_types_map_to_arrow_types():
    t = arrow_type(REVIEW)
    assert t == pa.struct([
        pa.field("sentiment", pa.string(), nullable=False), pa.field("stars", pa.int64(), nullable=False),
        ("score", pa.float64()), ("spam", pa.bool_()), ("tags", pa.list_(pa.string())),
        ("author", pa.struct([("name", pa.string()), ("age", pa.int64())])), ("note", pa.string()),
    ])


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "properties": {"x": {"oneOf": [{"type": "integer"}, {"type": "string"}]}}},
     "$.properties.x.oneOf: its options have different types"),
    ({"type": "object", "properties": {"x": {"type": ["integer", "string"]}}}, "$.properties.x.type: "),
    ({"type": "object", "properties": {"x": {"type": "object"}}}, "$.properties.x: an object without properties"),
    ({"type": "object", "properties": {"x": {"type": "array"}}}, "$.properties.x: an array needs `items`"),
    ({"type": "object", "properties": {"x": {"enum": [1, "a"]}}}, "$.properties.x.enum: its values have"),
    ({"type": "object", "properties": {"x": {"$ref": "#"}}}, "$.properties.x.properties.x: # refers to itself"),
    ({"type": "object", "properties": {"x": {}}}, "$.properties.x: any JSON value is allowed here"),
])
def test_a_schema_without_one_column_type_names_its_place(schema, where):
    with pytest.raises(SchemaError, match=f"^{where.replace('$', '[$]')}"):
        arrow_type(schema)


def test_an_inexpressible_schema_is_a_one_line_spec_error():
    raw = {"name": "j", "input": {"path": "/in"}, "output": {"path": "/out"}, "workers": [{"engine": "echo"}],
           "sampling": {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {
               "type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}}}}}}}
    with pytest.raises(SpecError) as e:
        parse_spec(raw, {})
    assert str(e.value) == ("job.yaml: sampling.response_format.json_schema.schema: $.properties.v.anyOf: its "
                            "options have different types (bool, int64); one column needs one type")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("sampling, bad", [
    ({"regex": "[a-", "n": 1}, "sampling.regex: not a valid regular expression"),
    ({"choice": []}, "sampling.choice: "),
    ({"regex": "a", "choice": ["a"]},
     "sampling: give one of response_format, regex, choice and grammar, not regex and choice"),
    ({"response_format": {"type": "json_schema"}}, "sampling.response_format: json_schema: give it exactly when"),
    ({"logprobs": 21}, "sampling.logprobs: expected a value <= 20"),
    ({"n": 0}, "sampling.n: expected a value >= 1"),
    ({"n": 3}, "sampling: n: 3 completions need a temperature above 0"),
])
def test_bad_constraint_keys_are_spec_errors(sampling, bad):
    raw = {"name": "j", "input": {"path": "/in"}, "output": {"path": "/out"}, "workers": [{"engine": "echo"}],
           "sampling": sampling}
    with pytest.raises(SpecError, match="^job.yaml: " + bad.replace("[", "[[]")):
        parse_spec(raw, {})


def test_embed_jobs_refuse_generate_settings_and_chat_rows():
    base = {"name": "j", "task": "embed", "input": {"path": "/in"}, "output": {"path": "/out"},
            "workers": [{"engine": "echo"}]}
    with pytest.raises(SpecError, match="sampling.logprobs: a generate setting; task embed generates no text"):
        parse_spec({**base, "sampling": {"logprobs": 2}}, {})
    with pytest.raises(SpecError, match="task embed takes prompts"):
        parse_spec({**base, "input": {"path": "/in", "messages_column": "m"}}, {})
    with pytest.raises(SpecError, match="embedding: a task embed setting"):
        parse_spec({**base, "task": "generate", "embedding": {"normalize": False}}, {})


def test_new_keys_left_unset_keep_an_existing_jobs_fingerprint():
    raw = {"name": "j", "input": {"path": "/in"}, "output": {"path": "/out"}, "workers": [{"engine": "echo"}]}
    plain, _ = parse_spec(raw, {})
    assert plain.fingerprint() == parse_spec({**raw, "sampling": {"max_tokens": 64}}, {})[0].fingerprint()
    assert plain.fingerprint() != parse_spec({**raw, "sampling": {"n": 2, "temperature": 1}}, {})[0].fingerprint()
    assert plain.fingerprint() != parse_spec({**raw, "task": "embed"}, {})[0].fingerprint()


def done(text: str, reason: str = "stop") -> Completion:
    return Completion(0, text, reason, 3, 5)


def test_check_parses_a_valid_row_and_names_what_is_wrong_with_others():
    s = json_sampling()
    ok = check(done('{"sentiment": "positive", "stars": 4, "tags": ["a"]}'), s)
    assert ok.error is None and ok.parsed == {"sentiment": "positive", "stars": 4, "tags": ["a"]}
    assert check(done('{"sentiment": "positive", "st', "length"), s).error.startswith("json_incomplete: ")
    assert check(done('{"sentiment": "positive"', "stop"), s).error.startswith("json_invalid: ")
    wrong = check(done('{"sentiment": "happy", "stars": 4}'), s)
    assert wrong.error.startswith("json_invalid: $.sentiment: 'happy' is not one of") and wrong.parsed is None
    assert wrong.text == '{"sentiment": "happy", "stars": 4}'  # kept, to see what the model wrote
    assert check(done('{"stars": 9, "sentiment": "neutral"}'), s).error.startswith("json_invalid: $.stars: 9 is")
    obj = Sampling.model_validate({"response_format": {"type": "json_object"}})
    assert check(done('[1, 2]'), obj).error.startswith("json_invalid: $: [1, 2] is not of type 'object'")
    assert check(done('{"a": 1}'), obj).error is None


def test_check_holds_regex_and_choice_rows_to_their_constraint():
    regex = Sampling(regex=r"\d{3}-[a-z]+")
    assert check(done("123-abc"), regex).error is None
    assert check(done("123-abc!"), regex).error.startswith("regex_mismatch: ")
    choice = Sampling(choice=["yes", "no"])
    assert check(done("no"), choice).error is None
    assert check(done("maybe"), choice).error == "choice_mismatch: the text is none of the choices"
    failed = Completion.failed(0, "prompt_too_long: x")
    assert check(failed, choice) is failed  # an engine's own error stands


def test_parsed_column_keeps_rows_that_fit_and_nulls_those_that_do_not():
    t = arrow_type(REVIEW)
    col = parsed_column([{"sentiment": "neutral", "stars": 3}, None, {"sentiment": "x", "stars": "many"}], t)
    assert col.to_pylist()[0]["stars"] == 3 and col.to_pylist()[1:] == [None, None]


def spec_with(sampling: dict, **more):
    raw = {"name": "j", "input": {"path": "/in", "id_column": "id", **more}, "output": {"path": "/out"},
           "workers": [{"engine": "echo"}], "sampling": sampling}
    return parse_spec(raw, {})[0]


def test_parsed_reads_back_typed_in_pyarrow_pandas_and_duckdb(tmp_path):
    spec = spec_with({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": REVIEW}}})
    texts = ['{"sentiment": "positive", "stars": 5, "score": 0.5, "tags": ["a", "b"], "author": {"name": "x"}}',
             '{"sentiment": "negative", "stars": 1}', '{"sentiment": "negative", "st']
    results = [check(done(t, "length" if i == 2 else "stop"), spec.sampling) for i, t in enumerate(texts)]
    unit = Unit("part-00000-0000000000", "in.parquet", 0, 3, (0,), 0)
    table = output_table(spec, unit, pa.table({"id": [10, 11, 12]}), results)
    pq.write_table(table, tmp_path / "part.parquet")

    back = pq.read_table(tmp_path / "part.parquet")
    assert back.schema.field("parsed").type == arrow_type(REVIEW)
    df = back.to_pandas()
    assert df["parsed"][0]["tags"].tolist() == ["a", "b"] and df["parsed"][2] is None
    assert df["error"][2].startswith("json_incomplete")
    rows = duckdb.sql(f"SELECT parsed.sentiment, count(*), sum(parsed.stars) FROM read_parquet('{tmp_path}/*.parquet') "
                      "GROUP BY 1 ORDER BY 1 NULLS LAST").fetchall()
    assert rows == [("negative", 1, 1), ("positive", 1, 5), (None, 1, None)]
    assert duckdb.sql(f"SELECT parsed.author.name FROM '{tmp_path}/*.parquet' WHERE id = 10").fetchall()[0] == ("x",)


def test_logprobs_and_choices_columns_follow_the_job_spec(tmp_path):
    spec = spec_with({"logprobs": 2, "n": 2, "temperature": 0.5})
    first = Completion(0, "a b", "stop", 2, 2, logprobs=[TokenLogprob("a", -0.1, [("a", -0.1), ("c", -2.5)])],
                       choices=[Choice("a b", "stop", 2), Choice("c", "length", 1)])
    unit = Unit("part-00000-0000000000", "in.parquet", 0, 2, (0,), 0)
    table = output_table(spec, unit, pa.table({"id": [1, 2]}), [first, Completion.failed(1, "x: y")])
    pq.write_table(table, tmp_path / "p.parquet")
    got = duckdb.sql(f"SELECT logprobs[1].token, logprobs[1].top_logprobs[2].token, len(choices), "
                     f"choices[2].finish_reason FROM '{tmp_path}/p.parquet' WHERE id = 1").fetchall()[0]
    assert got == ("a", "c", 2, "length")
    assert pq.read_table(tmp_path / "p.parquet").column("choices").to_pylist()[1] is None
    plain = output_table(spec_with({}), unit, pa.table({"id": [1, 2]}), [first, Completion.failed(1, "x: y")])
    assert not {"logprobs", "choices", "parsed"} & set(plain.column_names)


def test_every_choice_counts_toward_the_units_generated_tokens():
    from runner.output.store import unit_stats

    unit = Unit("part-00000-0000000000", "in.parquet", 0, 1, (0,), 0)
    c = Completion(0, "a", "stop", 2, 1, choices=[Choice("a", "stop", 1), Choice("b c d", "stop", 3)])
    assert unit_stats(unit, [c], pool="p", worker="w", run_id="r").completion_tokens == 4


def test_a_rows_own_constraint_replaces_the_jobs():
    from runner.inputs.rows import decode_sampling

    base = json_sampling()
    bad: dict[int, str] = {}
    rows = decode_sampling(pa.chunked_array([[json.dumps({"choice": ["a", "b"]}), None,
                                              json.dumps({"regex": "[0-9]+", "max_tokens": 4})]]), base, bad)
    assert not bad
    assert rows[0].choice == ["a", "b"] and rows[0].response_format is None
    assert rows[1] is base
    assert rows[2].regex == "[0-9]+" and rows[2].response_format is None and rows[2].max_tokens == 4
