"""The Python API in process, on one real local Ray with the echo engine (the engine does not matter here):
submit from a path, a dict and a JobSpec, resume, status, read the committed rows, typed errors."""

import json
import subprocess
import sys

import pytest
from conftest import S3_OPTIONS, write_job, write_shard
from ray.job_submission import JobDetails, JobType
from ray.job_submission import JobStatus as RayJobStatus

import runner
from runner.api import remote_error, spec_text
from runner.output.manifest import JobStatus, Manifest, PoolStats, WorkerStats
from runner.spec.job import parse_spec

ROWS = {"a.parquet": 10, "b.parquet": 6}  # with unit_rows 4: units of 4, 4, 2 and 4, 2
UNITS = 5


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "in").mkdir()
    start = 0
    for name, n in ROWS.items():
        prompts = [f"review {i} says the price was good" for i in range(start, start + n)]
        write_shard(tmp_path / "in" / name, prompts, ids=list(range(start, start + n)))
        start += n
    return tmp_path / "in"


def job_dict(tmp_path, out="out", **over) -> dict:
    return {"name": "api", "input": {"path": str(tmp_path / "in"), "id_column": "id"},
            "output": {"path": str(tmp_path / out)}, "sampling": {"max_tokens": 4},
            "workers": [{"engine": "echo", "num_cpus": 0.5}], "unit_rows": 4, **over}


def test_import_runner_loads_no_api_until_asked():
    code = ("import sys, runner; assert 'runner.api' not in sys.modules and 'ray' not in sys.modules; "
            "runner.submit; assert 'runner.api' in sys.modules; import runner.inputs.plan; from runner import plan; "
            "print(plan.__module__, sorted(runner.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("runner.api ")  # the API function, not a module of that name
    assert all(n in out for n in ("'submit'", "'status'", "'read'", "'plan'", "'Manifest'", "'JobFailedError'"))


def test_submit_a_path_returns_the_typed_manifest_then_resumes(ray_local, tmp_path, inputs):
    path = write_job(tmp_path / "job.yaml", json.dumps(job_dict(tmp_path)))  # JSON is YAML
    before = runner.status(path)
    assert isinstance(before, JobStatus) and not before.started and not before.succeeded
    assert (before.units_total, before.units_done, before.rows_ok, before.pools["echo0"].rows) == (None, 0, 0, 0)
    m = runner.submit(path)
    assert isinstance(m, Manifest) and m.status == "succeeded" and m.request_counts is None
    assert (m.rows_total, m.rows, m.rows_ok, m.rows_failed) == (16, 16, 16, 0)
    assert (m.units_total, m.units_committed, m.units_skipped, m.units_this_run) == (UNITS, UNITS, 0, UNITS)
    assert m.completion_tokens == 16 * 4  # echo: max_tokens words of each prompt
    pool = m.pools["echo0"]
    assert isinstance(pool, PoolStats) and pool.rows == 16
    assert all(isinstance(w, WorkerStats) for w in pool.workers.values())
    assert sum(w.rows for w in pool.workers.values()) == 16
    assert m == Manifest.model_validate_json((tmp_path / "out" / "_manifest.json").read_text())
    assert runner.read(path).count_rows() == m.rows

    again = runner.submit(path)
    assert (again.units_skipped, again.units_this_run, again.rows_ok) == (UNITS, 0, 16)
    assert again.run_id != m.run_id
    s = runner.status(path)
    assert s.started and s.succeeded and (s.units_done, s.units_total, s.rows_ok) == (UNITS, UNITS, 16)
    assert s.pools["echo0"].rows == 16


def test_a_dict_is_resolved_and_recorded_as_yaml_is(ray_local, tmp_path, inputs, monkeypatch):
    monkeypatch.setenv("API_OUT", str(tmp_path / "from-env"))
    m = runner.submit(job_dict(tmp_path, output={"path": "${API_OUT}"}))
    assert m.rows_ok == 16 and (tmp_path / "from-env" / "_SUCCESS").exists()
    assert m.spec["output"]["path"] == "${API_OUT}"  # the reference is recorded, not its value
    assert m.spec["unit_rows"] == 4 and m.spec["sampling"]["temperature"] == 0.0  # defaults filled in


def test_a_jobspec_runs_and_read_sees_only_committed_units(ray_local, tmp_path, inputs):
    # a file a unit, so one unit can be taken back out of the ledger by removing its marker
    spec, _ = parse_spec(job_dict(tmp_path, output={"path": str(tmp_path / "out"), "target_file_mb": 0}), env={})
    m = runner.submit(spec)
    assert m.status == "succeeded" and m.spec == spec.model_dump(mode="json")
    rows = runner.read(spec).to_table().sort_by("id")
    assert rows["id"].to_pylist() == list(range(16))
    assert rows["text"].to_pylist()[:2] == ["review 0 says the", "review 1 says the"]

    (tmp_path / "out" / "_commits" / "part-00000-0000000004.json").unlink()  # a.parquet rows 4..7
    for dataset in (runner.read(spec), runner.read(str(tmp_path / "out")), runner.read(tmp_path / "out")):
        ids = sorted(dataset.to_table(columns=["id"])["id"].to_pylist())
        assert ids == [i for i in range(16) if not 4 <= i < 8]


def test_read_from_s3_by_job_and_by_url(ray_local, tmp_path, inputs, s3_bucket):
    bucket, _ = s3_bucket
    job = job_dict(tmp_path, output={"path": f"s3://{bucket}/out", "storage_options": S3_OPTIONS})
    assert runner.submit(job).rows_ok == 16
    assert sorted(runner.read(job).to_table()["id"].to_pylist()) == list(range(16))
    options, _ = parse_spec(job, env=dict(__import__("os").environ))
    by_url = runner.read(f"s3://{bucket}/out", storage_options=dict(options.output.storage_options))
    assert by_url.count_rows() == 16 and all(f.startswith(f"{bucket}/out/part-") for f in by_url.files)


def test_typed_errors(ray_local, tmp_path, inputs):
    bad = job_dict(tmp_path, workers=[{"engine": "echo", "paralel": 2}])
    for call in (runner.submit, runner.status, runner.read):
        with pytest.raises(runner.SpecError) as e:
            call(bad)
        assert str(e.value) == "job dict: workers[0].paralel: unknown key"
    with pytest.raises(runner.StorageError, match="holds no runner job"):
        runner.read(str(tmp_path / "in"))
    with pytest.raises(runner.SpecError, match="storage_options: given with a job"):
        runner.read(job_dict(tmp_path), storage_options={})


def test_a_job_over_max_failed_rows_raises_job_failed(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.parquet", ["a b", None, "c", None, "d"])
    job = job_dict(tmp_path, max_failed_rows=1)
    with pytest.raises(runner.JobFailedError, match="2 of 5 rows failed, more than max_failed_rows"):
        runner.submit(job)
    s = runner.status(job)
    assert s.started and not s.succeeded and (s.rows_failed, s.errors) == (2, {"null_prompt": 2})
    assert runner.read(job).count_rows() == 5  # failed rows are committed too, with their error


@pytest.mark.parametrize("code,cls", [(7, runner.JobFailedError), (2, runner.SpecError), (1, runner.ClusterError)])
def test_a_remote_failure_is_the_error_its_exit_code_stands_for(code, cls):
    info = JobDetails(type=JobType.SUBMISSION, submission_id="runner-api-1", status=RayJobStatus.FAILED,
                      message=f"Job entrypoint command failed with exit code {code}", driver_exit_code=code,
                      entrypoint="runner submit --spec-from-env RUNNER_JOB_YAML --no-progress")
    e = remote_error(info, "runner: job api: 5 units\nerror: job api: 2 of 5 rows failed\n", "runner-api-1")
    assert type(e) is cls and str(e) == "submission runner-api-1 failed: job api: 2 of 5 rows failed"


def test_a_dashboard_gets_references_not_resolved_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("API_SECRET", "s3cr3t")
    job = job_dict(tmp_path, output={"path": "s3://b/o", "storage_options": {"secret": "${API_SECRET}"}})
    spec, _ = parse_spec(job, env=dict(__import__("os").environ))
    text = spec_text(job, spec)  # the cluster resolves ${API_SECRET}; RemoteJobs.submit forwards it
    assert "${API_SECRET}" in text and "s3cr3t" not in text
    with pytest.raises(runner.SpecError, match="a JobSpec holds resolved secrets"):
        spec_text(spec, spec)


def test_plan_returns_the_estimate(tmp_path, inputs):
    from runner.estimate.estimate import Estimate

    estimate = runner.plan(job_dict(tmp_path))  # no engine started: counted with the pool's tokenizer
    assert isinstance(estimate, Estimate) and (estimate.name, estimate.files) == ("api", 2)
    assert (estimate.units, estimate.rows) == (UNITS, 16)
