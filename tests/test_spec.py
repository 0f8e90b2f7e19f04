from pathlib import Path

import pytest

from runner.errors import SpecError
from runner.spec import JobSpec, load_spec, parse_spec

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
    ({"workers": [{"engine": "echo", "replicas": "two"}]}, 'workers[0].replicas: expected an integer, got "two"'),
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


def test_spec_is_frozen():
    spec, _ = parse()
    with pytest.raises(Exception):
        spec.unit_rows = 3
    assert isinstance(spec, JobSpec)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("jobs/*.yaml")), ids=lambda p: p.name)
def test_shipped_job_specs_are_valid(path):
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "BUCKET": "b"}
    spec, resolved = load_spec(path, env)
    assert spec.name and spec.workers
    # the resolved spec, defaults filled in, is a valid spec of the same job; so is the redacted one _job.json
    # records (secrets shown as their ${VAR})
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert JobSpec.model_validate(resolved).pool_names() == spec.pool_names()
