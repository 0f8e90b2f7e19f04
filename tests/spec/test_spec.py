import copy
from pathlib import Path

import pytest
from pydantic import ValidationError

from runner.errors import SpecError
from runner.spec.job import JobSpec, load_spec, parse_spec

BASE = {
    "name": "j",
    "input": {"path": "/data/in/", "prompt_column": "prompt"},
    "output": {"path": "/data/out/"},
    "workers": [{"engine": "echo"}],
}


def parse(**over):
    raw = {**BASE, **over}
    return parse_spec(raw, env={"SECRET": "s3cr3t", "HOST": "example"})


def test_defaults_and_absolute_paths():
    spec, _ = parse(input={"path": "rel/in"})
    assert spec.unit_rows == 256 and spec.sampling.max_tokens == 64
    assert spec.input.path.startswith("/") and spec.input.path.endswith("rel/in")
    assert spec.output.path == "/data/out/"


@pytest.mark.parametrize("over, message", [
    ({"workers": [{"engine": "echo", "replicas": "two"}]},
     'workers[0].replicas: expected `auto` or an integer of at least 1, got "two"'),
    ({"workers": [{"engine": "echo", "replica": 2}]}, "workers[0].replica: unknown key"),
    ({"sampling": {"temperature": "hot"}}, 'sampling.temperature: expected a number, got "hot"'),
    ({"input": {"prompt_column": "p"}}, "input.path: required key is missing"),
    ({"workers": [{"engine": "llamacpp"}]}, "workers[0].model: required key is missing"),
    ({"workers": []}, "workers: List should have at least 1 item after validation, not 0"),
    ({"unit_rows": 0}, "unit_rows: expected a value >= 1, got 0"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"sampling": {"stop": ["end", ""]}}, 'sampling.stop: an empty string would end every row at once'),
    ({"input": {"path": "in/", "prompt_column": "p", "messages_column": "m"}},
     "input: give prompt_column or messages_column, not both"),
    ({"workers": [{"engine": "echo"}, {"engine": "echo", "name": "echo0"}]},
     "workers[1].name: pool name 'echo0' is already used by workers[0]; each pool needs its own"),
])
def test_errors_name_the_key(over, message):
    with pytest.raises(SpecError) as e:
        parse(**over)
    assert str(e.value) == f"job.yaml: {message}"


@pytest.mark.parametrize("inp, out, message", [
    ("/d/in/", "/d/in/out/", "output.path /d/in/out/ is inside input.path /d/in/: the job could read its own outputs"),
    ("/d/in/*.parquet", "/d/in/out", "output.path /d/in/out is inside input.path /d/in/*.parquet:"),
    ("s3://b/in", "s3://b/in/out", "output.path s3://b/in/out is inside input.path s3://b/in:"),
    ("file:///d/in", "/d/in/out", "output.path /d/in/out is inside input.path file:///d/in:"),
    ("/d/out/a.parquet", "/d/out", "input.path /d/out/a.parquet is inside output.path /d/out: --overwrite would"),
    ("/d/out/sub/", "/d/out/", "input.path /d/out/sub/ is inside output.path /d/out/: --overwrite would delete it"),
    ("/d/x/", "/d/x", "input.path /d/x/ and output.path /d/x are the same location"),
])
def test_output_and_input_must_not_overlap(inp, out, message):
    with pytest.raises(SpecError) as e:
        parse(input={"path": inp}, output={"path": out})
    assert str(e.value).startswith(f"job.yaml: {message}") and "\n" not in str(e.value)


@pytest.mark.parametrize("inp, out", [
    ("/d/in/", "/d/in2/"),  # a prefix, but not on a / boundary
    ("/d/in2/*.parquet", "/d/in/out"),
    ("/d/in/", "/d/out/in/"),
    ("s3://b/in/", "/b/in/out/"),  # another protocol
])
def test_locations_apart_pass(inp, out):
    spec, _ = parse(input={"path": inp}, output={"path": out})
    assert spec.output.path == out


def test_env_vars_resolved_and_never_saved():
    spec, redacted = parse(output={"path": "s3://${HOST}/out", "storage_options": {"secret": "${SECRET}",
                                                                                   "key": "literal-key"}})
    assert spec.output.path == "s3://example/out"
    assert spec.output.storage_options["secret"] == "s3cr3t"
    text = repr(redacted)
    assert "s3cr3t" not in text and "literal-key" not in text
    assert redacted["output"]["storage_options"]["secret"] == "${SECRET}"


def test_unset_variable_is_named():
    with pytest.raises(SpecError, match=r"output.storage_options.key: environment variable NOPE is not set"):
        parse(output={"path": "/o", "storage_options": {"key": "${NOPE}"}})


def test_default_in_variable():
    spec, _ = parse(output={"path": "/o/${MISSING:-fallback}"})
    assert spec.output.path == "/o/fallback"


def test_wrong_type_of_secret_does_not_echo_it():
    with pytest.raises(SpecError) as e:
        parse(unit_rows="${SECRET}")
    assert "s3cr3t" not in str(e.value)


def test_fingerprint_changes_with_outputs_not_with_replicas():
    a, _ = parse()
    b, _ = parse(workers=[{"engine": "echo", "replicas": 4}])
    c, _ = parse(sampling={"max_tokens": 5})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


VLLM = {"engine": "vllm", "model": "org/model"}
# Each default written out, one at a time (a key path and its default): none may change the fingerprint.
DEFAULTS = [
    (("sampling", "n"), 1), (("sampling", "logprobs"), 0), (("sampling", "response_format"), None),
    (("sampling", "response_format"), {"type": "text"}), (("sampling", "regex"), None),
    (("sampling", "choice"), None), (("sampling", "grammar"), None), (("sampling", "temperature"), 0),
    (("sampling", "stop"), []), (("input", "format"), "parquet"), (("input", "columns"), []),
    (("input", "id_column"), None), (("input", "messages_column"), None), (("input", "sampling_column"), None),
    (("task",), "generate"), (("embedding", "normalize"), True), (("unit_rows",), 256),
    (("workers", 1, "chat_template"), None), (("workers", 1, "engine_args", "dtype"), "auto"),
    (("workers", 1, "engine_args", "runner"), "generate"), (("workers", 1, "engine_args", "runner"), "auto"),
    (("workers", 1, "engine_args", "revision"), None),
    (("workers", 1, "engine_args", "logprobs_mode"), "raw_logprobs"),
    (("workers", 1, "engine_args", "structured_outputs_config"), {}),
    (("workers", 1, "engine_args", "structured_outputs_config"), None),
    (("workers", 1, "engine_args", "structured_outputs_config"), {"backend": "xgrammar"}),
    (("workers", 1, "engine_args", "structured_outputs_config"), {"disable_any_whitespace": True}),
    (("workers", 1, "engine_args", "structured_outputs_config"), {"reasoning_parser": "",
                                                                  "disable_additional_properties": False}),
]


def written(*pairs: tuple) -> dict:
    """BASE with an echo and a vLLM pool, and each (key path, value) of `pairs` written in."""
    raw = copy.deepcopy({**BASE, "workers": [{"engine": "echo"}, {**VLLM, "engine_args": {"max_num_seqs": 8}}]})
    for key, value in pairs:
        *parents, last = key
        node = raw
        for k in parents:
            node = node.setdefault(k, {}) if isinstance(k, str) else node[k]
        node[last] = value
    return raw


def fingerprint(*pairs: tuple) -> str:
    return parse_spec(written(*pairs), {})[0].fingerprint()


@pytest.mark.parametrize("key, value", DEFAULTS, ids=[f"{'.'.join(map(str, k))}={v}" for k, v in DEFAULTS])
def test_a_default_written_out_changes_no_fingerprint(key, value):
    assert fingerprint((key, value)) == fingerprint()


SAMPLED = (("sampling", "temperature"), 0.7)


@pytest.mark.parametrize("key, value", [
    (("sampling", "n"), 2), (("sampling", "logprobs"), 1), (("sampling", "response_format"), {"type": "json_object"}),
    (("workers", 1, "engine_args", "dtype"), "float16"), (("workers", 1, "engine_args", "runner"), "draft"),
    (("workers", 1, "engine_args", "structured_outputs_config"), {"disable_any_whitespace": False}),
    (("workers", 1, "engine_args", "structured_outputs_config"), {"backend": "guidance"}),
    (("workers", 1, "engine_args", "structured_outputs_config"), {"reasoning_parser": "qwen3"}),
], ids=lambda v: str(v))
def test_a_value_other_than_the_default_changes_the_fingerprint(key, value):
    assert fingerprint(SAMPLED, (key, value)) != fingerprint(SAMPLED)  # sampled: n > 1 needs a temperature


def test_existing_jobs_keep_their_fingerprints():
    # What these jobs hashed to before a default written out stopped counting: their resumes still match.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    jobs = {
        "plain": ({}, "1f7c64546729faca"),
        "n and logprobs": ({"sampling": {"n": 2, "temperature": 1, "logprobs": 3}}, "5e473bbe8a0b7937"),
        "a schema": ({"sampling": {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}},
                     "f0c377e2946f6c19"),
        "vllm": ({"workers": [{**VLLM, "engine_args": {"dtype": "float16", "structured_outputs_config": {
            "backend": "guidance"}}}]}, "4753a406cda2e921"),
        "openai_batch": ({"input": {"path": "/data/in/", "format": "openai_batch"}}, "e72d0182a332af6a"),
        "embed": ({"task": "embed", "embedding": {"normalize": False}}, "642d2db4b52e6088"),
    }
    got = {name: parse(**over)[0].fingerprint() for name, (over, _) in jobs.items()}
    assert got == {name: fingerprint for name, (_, fingerprint) in jobs.items()}
    assert parse(sampling={"n": 1})[0].fingerprint() == jobs["plain"][1]  # was 35232b0aeff97737: resume refused


def test_spec_is_frozen():
    spec, _ = parse()
    with pytest.raises(ValidationError):
        spec.unit_rows = 3
    assert isinstance(spec, JobSpec)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("jobs/*.yaml")), ids=lambda p: p.name)
def test_shipped_job_specs_are_valid(path):
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "BUCKET": "b"}
    spec, resolved = load_spec(path, env)
    assert spec.name and spec.workers
    # the resolved spec, defaults filled in, is a valid spec of the same job; so is the redacted one _job.json
    # records (secrets shown as their ${VAR})
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    # and resumes the job: every default written out, it has the same fingerprint
    assert JobSpec.model_validate(spec.model_dump(mode="json")).fingerprint() == spec.fingerprint()
    assert JobSpec.model_validate(resolved).pool_names() == spec.pool_names()
