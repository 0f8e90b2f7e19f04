"""Bad input, one kind a row of a table: either one line naming the culprit and a non-zero exit (no
traceback), or a row written with its error while the rest of the job completes."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import require_vllm, write_job, write_shard

from runner.cli import main
from runner.cluster.ray import RunOptions
from runner.job import run_job
from runner.spec.job import load_spec

pytest.importorskip("llama_cpp")


def spec_text(tmp, model, inp=None, out=None, extra=""):
    return f"""
        name: bad-input
        input: {{path: {inp or tmp / 'in'}, prompt_column: prompt, id_column: id}}
        output: {{path: {out or tmp / 'out'}}}
        sampling: {{max_tokens: 4}}
        workers: [{{engine: llamacpp, model: {model}, num_cpus: 1, n_ctx: 64, parallel: 4, replicas: 1}}]
        unit_rows: 8
        {extra}
        """


def good_input(tmp):
    (tmp / "in").mkdir(exist_ok=True)
    write_shard(tmp / "in" / "a.parquet", ["the price was good", "the service"] * 3)


def write_raw(path, **cols):
    pq.write_table(pa.table(cols), str(path))


# Each case: (kind, set-up(tmp, model) -> job.yaml text, exit code, what the one line says).
def _unknown_key(t, m):
    good_input(t)
    return spec_text(t, m, extra="bogus_key: 1")


def _wrong_type(t, m):
    good_input(t)
    return spec_text(t, m).replace("replicas: 1", "replicas: two")


def _missing_path(t, m):
    return spec_text(t, m, inp=t / "nowhere")


def _no_parquet(t, m):
    (t / "in").mkdir()
    (t / "in" / "notes.txt").write_text("x")
    return spec_text(t, m)


def _no_prompt_column(t, m):
    good_input(t)
    return spec_text(t, m).replace("prompt_column: prompt", "prompt_column: question")


def _prompt_not_string(t, m):
    (t / "in").mkdir()
    write_raw(t / "in" / "a.parquet", id=[1, 2], prompt=[3, 4])
    return spec_text(t, m)


def _corrupt_parquet(t, m):
    good_input(t)
    (t / "in" / "b.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    return spec_text(t, m)


def _empty_file(t, m):
    good_input(t)
    (t / "in" / "b.parquet").write_bytes(b"")
    return spec_text(t, m)


def _schemas_differ(t, m):
    good_input(t)
    write_raw(t / "in" / "b.parquet", id=pa.array(["x"], pa.string()), prompt=["hello"])
    return spec_text(t, m)


def _model_missing(t, m):
    good_input(t)
    return spec_text(t, m + ".missing")


def _model_not_gguf(t, m):
    good_input(t)
    (t / "model.gguf").write_bytes(b"not a model")
    return spec_text(t, t / "model.gguf")


def _model_cut_short(t, m):
    good_input(t)
    with open(m, "rb") as f:
        (t / "cut.gguf").write_bytes(f.read(24))  # the counts, then nothing of what they count
    return spec_text(t, m).replace(str(m), str(t / "cut.gguf"))


def _output_inside_input(t, m):
    good_input(t)
    return spec_text(t, m, out=t / "in" / "out")


def _input_inside_output(t, m):
    good_input(t)
    return spec_text(t, m, out=t)


def _output_not_writable(t, m):
    good_input(t)
    (t / "blocker").write_text("a file where a directory should be")
    return spec_text(t, m, out=t / "blocker" / "out")


def _var_not_set(t, m):
    good_input(t)
    return spec_text(t, m).replace(f"path: {t / 'out'}", 'path: "${RUNNER_TEST_NEVER_SET}/out"')


def _not_yaml(t, m):
    return "name: [unclosed\n"


def _bad_value(t, m):
    good_input(t)
    return spec_text(t, m, extra="max_failed_rows: -3")


def _vllm_setting_on_llamacpp_key(t, m):
    good_input(t)
    return spec_text(t, m).replace("engine: llamacpp, model: " + str(m), "engine: vllm, model: org/m")


def _vllm_engine_arg_unknown(t, m):
    good_input(t)
    pool = "engine: vllm, model: org/m, num_gpus: 0, engine_args: {max_num_seq: 4}"
    return spec_text(t, m).replace("engine: llamacpp, model: " + str(m) + ", num_cpus: 1, n_ctx: 64, parallel: 4", pool)


CASES = [
    ("unknown key", _unknown_key, 2, "{t}/job.yaml: bogus_key: unknown key"),
    ("wrong type", _wrong_type, 2,
     '{t}/job.yaml: workers[0].replicas: expected `auto` or an integer of at least 1, got "two"'),
    ("missing input path", _missing_path, 3, "input.path: {t}/nowhere does not exist"),
    ("no Parquet files", _no_parquet, 3, "input.path: no *.parquet files under {t}/in"),
    ("missing prompt column", _no_prompt_column, 3,
     "{t}/in/a.parquet: column 'question' (input.prompt_column) not found"),
    ("prompt column not a string", _prompt_not_string, 3,
     "{t}/in/a.parquet: prompt column 'prompt' has type int64, expected string"),
    ("corrupt Parquet file", _corrupt_parquet, 3, "{t}/in/b.parquet: not a readable Parquet file"),
    ("empty Parquet file", _empty_file, 3, "{t}/in/b.parquet: not a readable Parquet file"),
    ("schema differs across shards", _schemas_differ, 3, "{t}/in/b.parquet: column 'id' has type string but "),
    ("model file missing", _model_missing, 4, "workers[0].model: {m}.missing does not exist"),
    ("model file not a GGUF", _model_not_gguf, 4, "workers[0].model: {t}/model.gguf is not a GGUF file"),
    ("model file cut short", _model_cut_short, 4, "workers[0].model: {t}/cut.gguf ends inside its header"),
    ("output inside input", _output_inside_input, 2,
     "{t}/job.yaml: output.path {t}/in/out is inside input.path {t}/in: the job could read its own outputs"),
    ("input inside output", _input_inside_output, 2,
     "{t}/job.yaml: input.path {t}/in is inside output.path {t}: --overwrite would delete it"),
    ("output location not writable", _output_not_writable, 5, "output.path: {t}/blocker/out is not writable"),
    ("${VAR} not set", _var_not_set, 2, "output.path: environment variable RUNNER_TEST_NEVER_SET is not set"),
    ("not YAML", _not_yaml, 2, "{t}/job.yaml: line 2 not valid YAML"),
    ("value out of range", _bad_value, 2, "max_failed_rows: expected a count >= 0 or a fraction below 1, got -3"),
    ("llama.cpp setting on a vLLM pool", _vllm_setting_on_llamacpp_key, 2,
     "workers[0]: n_ctx is a llamacpp setting; for vllm set engine_args.max_model_len"),
    ("vLLM engine_args key vLLM lacks", _vllm_engine_arg_unknown, 2,
     "workers[0].engine_args.max_num_seq: not an argument of vLLM {v}'s EngineArgs (did you mean max_num_seqs?)"),
]


@pytest.mark.parametrize("kind, setup, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path, tiny_model, kind, setup, code, message):
    path = tmp_path / "job.yaml"
    write_job(path, setup(tmp_path, tiny_model))
    result = CliRunner().invoke(main, ["validate", str(path)])
    expected = message.format(t=tmp_path, m=tiny_model, v=require_vllm().__version__ if "{v}" in message
                              else "")
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


ROWS = [  # (kind, prompt bytes or None, the row's error kind; None: the row succeeds)
    ("good row", b"the price was good", None),
    ("null prompt", None, "null_prompt"),
    ("empty prompt", b"", "empty_prompt"),
    ("blank prompt", b"   \n", "empty_prompt"),
    ("prompt longer than the context", b"word " * 200, "prompt_too_long"),
    ("invalid UTF-8 bytes", b"caf\xe9 \xff\xfe", "invalid_utf8"),
    ("another good row", b"the service", None),
]


def test_bad_rows_are_written_with_their_error_and_the_job_completes(ray_local, tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    write_raw(tmp_path / "in" / "a.parquet", id=list(range(len(ROWS))),
              prompt=pa.array([p for _, p, _ in ROWS], pa.binary()))
    path = write_job(tmp_path / "job.yaml", spec_text(tmp_path, tiny_model))
    spec, resolved = load_spec(path)
    manifest = run_job(spec, resolved, RunOptions(dashboard=False, progress=False))
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(out) == list(range(len(ROWS)))  # every row written once, bad or not
    for i, (kind, _, error) in enumerate(ROWS):
        got = out[i]["error"]
        if error is None:
            assert got is None and out[i]["text"] is not None, (kind, got)
        else:
            assert got and got.split(":", 1)[0] == error and out[i]["text"] is None, (kind, got)
    bad = sum(e is not None for _, _, e in ROWS)
    assert manifest["status"] == "succeeded" and manifest["rows_failed"] == bad
    assert sum(manifest["errors"].values()) == bad


def moto_process(no_auth_requests: int):
    """moto's S3 server in a process of its own that checks credentials once it has answered
    `no_auth_requests` requests, so unknown keys are refused: its URL and the process."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(no_auth_requests)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return url, proc


@pytest.fixture(scope="module")
def strict_s3():
    """moto's S3 server in a process of its own that checks credentials, so unknown keys are refused."""
    url, proc = moto_process(0)
    yield url
    proc.kill()
    proc.wait()


def test_bad_storage_credentials_are_one_line_and_keep_the_secret(strict_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("BAD_SECRET", "do-not-print-me-1f2e")
    path = write_job(tmp_path / "job.yaml", f"""
        name: creds
        input:
          path: s3://bucket/in/
          storage_options: {{key: no-such-key, secret: "${{BAD_SECRET}}", endpoint_url: "{strict_s3}"}}
        output: {{path: {tmp_path / 'out'}}}
        workers: [{{engine: echo}}]
        """)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 5, result.output
    assert result.output.strip().splitlines() == [
        "error: input.path: cannot list s3://bucket/in/: The AWS Access Key Id you provided does not exist in our "
        "records. (HTTP 403 InvalidAccessKeyId)"]
    assert "do-not-print-me" not in result.output


@pytest.fixture(scope="module")
def denying_s3():
    """moto's S3 server checking credentials and IAM policies, with one user whose key is known and who may do
    nothing: (url, key id, secret). Its first two requests (creating the user and the key) need no key."""
    import boto3

    url, proc = moto_process(2)
    iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
                       aws_secret_access_key="x")
    iam.create_user(UserName="nobody")
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    yield url, key["AccessKeyId"], key["SecretAccessKey"]
    proc.kill()
    proc.wait()


def s3_job(tmp_path, inp: str, out: str, options: dict) -> str:
    """An echo job with an S3 input or output (the other local); `options` are both's storage options."""
    good_input(tmp_path)
    where = {"input": {"path": inp}, "output": {"path": out}}
    for side in where.values():
        if side["path"].startswith("s3://"):
            side["storage_options"] = options
    top = {"name": "s3-refused", **where, "workers": [{"engine": "echo"}]}
    return str(write_job(tmp_path / "job.yaml", "".join(f"{k}: {json.dumps(v)}\n" for k, v in top.items())))


def one_line_at_once(command: str, path: str) -> str:
    """`runner COMMAND job.yaml` in-process: it must end with exit 5 and one line within 3 s; the line."""
    started = time.time()
    result = CliRunner().invoke(main, [command, path])
    elapsed = time.time() - started
    lines = result.output.strip().splitlines()
    assert result.exit_code == 5 and len(lines) == 1, result.output
    assert elapsed < 3, f"{elapsed:.1f}s: {result.output}"
    return lines[0]


@pytest.mark.parametrize("command", ["validate", "submit"])
@pytest.mark.parametrize("side", ["output", "input"])
def test_access_denied_is_one_line_at_once(denying_s3, tmp_path, monkeypatch, command, side):
    url, key, secret = denying_s3
    monkeypatch.setenv("DENIED_SECRET", secret)
    options = {"key": key, "secret": "${DENIED_SECRET}", "endpoint_url": url}
    paths = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), side: "s3://bucket/data/"}
    path = s3_job(tmp_path, paths["input"], paths["output"], options)
    line = one_line_at_once(command, path)
    assert line == {"output": "error: output.path: s3://bucket/data is not writable: Access Denied "
                              "(HTTP 403 AccessDenied)",
                    "input": "error: input.path: cannot list s3://bucket/data/: Access Denied "
                             "(HTTP 403 AccessDenied)"}[side]
    assert secret not in line


REFUSED = [  # (kind, output.path ({b}: the test's bucket), storage options over the bucket's, the cause said)
    ("invalid bucket name", "s3://Bad_Bucket!/out", {},
     'Parameter validation failed: Invalid bucket name "Bad_Bucket!": Bucket name must match the regex '),
    ("a parameter S3 rejects with 400", "s3://{b}/out", {"s3_additional_kwargs": {"StorageClass": "BOGUS"}},
     "The storage class you specified is not valid (HTTP 400 InvalidStorageClass)"),
    ("endpoint without ://", "s3://{b}/out", {"endpoint_url": "http//bad"}, "Invalid endpoint: http//bad"),
    ("endpoint not a URL", "s3://{b}/out", {"endpoint_url": "not a url"}, "Invalid endpoint: not a url"),
]


@pytest.mark.parametrize("command", ["validate", "submit"])
@pytest.mark.parametrize("kind, out, over, cause", REFUSED, ids=[r[0] for r in REFUSED])
def test_s3_refusals_no_retry_can_fix_are_one_line_at_once(s3_bucket, tmp_path, command, kind, out, over, cause):
    from conftest import S3_OPTIONS, S3_SECRET

    bucket, _ = s3_bucket
    out = out.format(b=bucket)
    path = s3_job(tmp_path, str(tmp_path / "in"), out, {**S3_OPTIONS, **over})
    line = one_line_at_once(command, path)
    assert line.startswith(f"error: output.path: {out} is not writable: {cause}"), line
    assert S3_SECRET not in line
