"""The CLI in-process (click's CliRunner) and as a real process, including a SIGKILL mid-job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner
from conftest import write_job, write_shard

from runner.cli import main

RUNNER = [sys.executable, "-m", "runner.cli"]


def job_yaml(tmp_path, model="MODEL", inp=None, extra="", unit_rows=8, max_tokens=8):
    return write_job(tmp_path / "job.yaml", f"""
        name: cli-job
        input:
          path: {inp or tmp_path / 'in'}
          prompt_column: prompt
          id_column: id
        output:
          path: {tmp_path / 'out'}
        sampling: {{max_tokens: {max_tokens}}}
        workers:
          - engine: llamacpp
            model: {model}
            replicas: 1
            num_cpus: 1
            n_ctx: 128
            parallel: 4
        unit_rows: {unit_rows}
        {extra}
        """)


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.parquet", ["the price was good", "the", None] * 4)
    return tmp_path / "in"


def sub(path: Path, old: str, new: str) -> Path:
    path.write_text(path.read_text().replace(old, new, 1))
    return path


@pytest.mark.parametrize("edit, code, message", [
    (lambda p, m: p.with_name("missing.yaml"), 2, "missing.yaml: cannot read job spec"),
    (lambda p, m: sub(p, "unit_rows", "bogus: 1\nunit_rows"), 2, "job.yaml: bogus: unknown key"),
    (lambda p, m: sub(p, "replicas: 1", "replicas: two"), 2,
     'workers[0].replicas: expected `auto` or an integer of at least 1, got "two"'),
    (lambda p, m: sub(p, "prompt_column: prompt", "prompt_column: q"), 3,
     "column 'q' (input.prompt_column) not found"),
    (lambda p, m: sub(p, m, m + ".nope"), 4, "does not exist"),
    (lambda p, m: sub(p, "unit_rows", ": : :\nunit_rows"), 2, "not valid YAML"),
    (lambda p, m: sub(p, "path: /", "path: ${NOT_SET_ANYWHERE}/"), 2,
     "input.path: environment variable NOT_SET_ANYWHERE is not set"),
])
@pytest.mark.parametrize("command", ["validate", "submit"])
def test_user_errors_are_one_line_and_exit_non_zero(tmp_path, tiny_model, inputs, edit, code, message, command):
    path = edit(job_yaml(tmp_path, tiny_model), tiny_model)
    result = CliRunner().invoke(main, [command, str(path)])
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output
    assert "Traceback" not in result.output


def test_validate_prints_the_plan(tmp_path, tiny_model, inputs):
    result = CliRunner().invoke(main, ["validate", str(job_yaml(tmp_path, tiny_model))])
    assert result.exit_code == 0, result.output
    assert "1 input files, 12 rows, 2 units of up to 8 rows" in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # runs nothing


def test_output_not_writable_is_named(tmp_path, tiny_model, inputs):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = write_job(tmp_path / "j.yaml", job_yaml(tmp_path, tiny_model).read_text().replace(
        f"path: {tmp_path / 'out'}", f"path: {blocker}/out"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 5 and "is not writable" in result.output and "Traceback" not in result.output


def test_subprocess_error_exit_and_stderr(tmp_path, tiny_model, inputs):
    path = job_yaml(tmp_path, tiny_model)
    path.write_text(path.read_text().replace("parallel: 4", "parallel: many"))
    proc = subprocess.run(RUNNER + ["submit", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    expected = f'error: {path}: workers[0].parallel: expected an integer, got "many"'
    assert proc.stderr.strip().splitlines() == [expected]


def test_status_before_and_after(tmp_path, tiny_model, inputs, ray_local):
    path = job_yaml(tmp_path, tiny_model)
    assert "not started" in CliRunner().invoke(main, ["status", str(path)]).output
    assert CliRunner().invoke(main, ["submit", "--no-progress", str(path)]).exit_code == 0
    out = CliRunner().invoke(main, ["status", str(path)]).output
    assert "succeeded; units 2/2, rows 12/12 (8 ok, 4 failed)" in out
    data = json.loads(CliRunner().invoke(main, ["status", "--json", str(path)]).output)
    assert data["rows_failed"] == 4 and data["errors"] == {"null_prompt": 4}


def committed(out: Path) -> dict[str, bytes]:
    """The commit markers under `out`, by name; a marker still being written (a dot-named temporary) is none."""
    d = out / "_commits"
    return {p.name: p.read_bytes() for p in d.iterdir() if not p.name.startswith(".")} if d.exists() else {}


def test_sigkill_mid_job_then_resume(tmp_path, tiny_model):
    """Kill `runner submit` with SIGKILL while it commits units; the next submit finishes the rest only."""
    (tmp_path / "in").mkdir()
    prompts = [f"Write a short summary of review {i}: the price was good" for i in range(1200)]
    write_shard(tmp_path / "in" / "a.parquet", prompts, row_group_size=20)
    path = job_yaml(tmp_path, tiny_model, unit_rows=20, max_tokens=48)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(RUNNER + ["submit", "--no-dashboard", str(path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while len(committed(tmp_path / "out")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and what its Ray started in its session
    proc.wait()
    time.sleep(1)  # a worker outside the session may finish the commit it was writing
    before = committed(tmp_path / "out")
    assert 3 <= len(before) < 60, f"killed with {len(before)} of 60 units committed"
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    time.sleep(2)  # let the killed job's Ray processes wind down

    done = subprocess.run(RUNNER + ["submit", "--no-dashboard", "--no-progress", str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["units_skipped"] >= len(before)
    assert manifest["units_skipped"] + manifest["units_this_run"] == manifest["units_total"] == 60
    after = committed(tmp_path / "out")
    assert {k: after[k] for k in before} == before  # committed before the kill: not generated again
    rows = ds.dataset(tmp_path / "out", format="parquet").to_table(columns=["source_row", "error"]).to_pylist()
    assert sorted(r["source_row"] for r in rows) == list(range(1200))  # none lost, none twice
    assert all(r["error"] is None for r in rows)


def test_status_of_neither_a_file_nor_a_submission_on_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    r = CliRunner().invoke(main, ["status", "runner-x-1234"])
    assert r.exit_code == 2
    assert r.output.strip() == ("error: runner-x-1234: no such job.yaml; give --address http://HEAD:8265 "
                                "(or RAY_ADDRESS) for a submission id")
    r = CliRunner().invoke(main, ["stop", "runner-x-1234"])
    assert r.exit_code == 2 and "runner-x-1234: no Ray cluster to ask; give --address" in r.output


def test_secrets_never_appear_in_logs_outputs_or_ray_session_files(s3_bucket, tmp_path):
    """Everything a real `runner submit -v` of an S3 job wrote: its output and log, every object of the
    output location, and every file of its Ray session (logs included)."""
    import shutil
    import tempfile

    from conftest import S3_OPTIONS, S3_SECRET

    bucket, fs = s3_bucket
    write_shard(f"{bucket}/in/a.parquet", [f"row {i}" for i in range(12)], fs=fs)
    job = write_job(tmp_path / "job.yaml", f"""
        name: secret-job
        input: {{path: "s3://{bucket}/in/", storage_options: {json.dumps(S3_OPTIONS)}}}
        output: {{path: "s3://{bucket}/out/", storage_options: {json.dumps(S3_OPTIONS)}}}
        unit_rows: 4
        workers: [{{engine: echo, num_cpus: 0.5}}]
        """)
    ray_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        run = subprocess.run([*RUNNER, "-v", "submit", str(job), "--no-dashboard"], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "RAY_TMPDIR": ray_dir})
        assert run.returncode == 0, run.stderr[-3000:]
        assert S3_SECRET not in run.stdout + run.stderr
        assert "━" not in run.stderr  # not a terminal: no progress bar
        fs.invalidate_cache()
        written = fs.find(f"{bucket}/out")
        assert {"_job.json", "_manifest.json", "_report.html", "_SUCCESS"} <= {n.rsplit("/", 1)[-1] for n in written}
        for name in written:
            assert S3_SECRET.encode() not in fs.cat_file(name), name
        assert "${TEST_S3_SECRET}" in fs.cat_file(f"{bucket}/out/_job.json").decode()  # the saved spec's reference
        session_files = [p for p in Path(ray_dir).rglob("*") if p.is_file() and not p.is_symlink()]
        assert any(p.suffix in (".out", ".err", ".log") for p in session_files)  # the logs were there to read
        for p in session_files:
            if p.stat().st_size < 50_000_000:
                assert S3_SECRET.encode() not in p.read_bytes(), p
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_report_of_a_job_yaml_or_an_output_path(tmp_path):
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.parquet", ["a b c", "d e"] * 6)
    job = write_job(tmp_path / "job.yaml", f"""
        name: reported
        input: {{path: {tmp_path / 'in'}}}
        output: {{path: {tmp_path / 'out'}}}
        unit_rows: 4
        workers: [{{engine: echo, num_cpus: 0.5}}]
        """)
    run = subprocess.run([*RUNNER, "submit", str(job), "--no-dashboard", "--no-progress"], timeout=300,
                         capture_output=True, text=True, env={**os.environ, "RUNNER_TIMINGS": "1"})
    assert run.returncode == 0, run.stderr
    timings = next(line for line in run.stderr.splitlines() if line.startswith("runner: timings: "))
    phases = [p.rsplit(" ", 1)[0] for p in timings.split(": ", 2)[2].split("; ")[0].split(", ")]
    assert phases[:4] == ["start", "plan", "claim", "ray start"], timings
    assert sorted(phases[-2:]) == ["finish", "ray stop"], timings  # the two overlap: either may end first
    assert any(p.startswith("workers up (engine load ") for p in phases), timings
    report = tmp_path / "out" / "_report.html"
    assert 'data-pool="echo0"' in report.read_text()  # written at the job's end
    report.unlink()
    for target in (str(job), str(tmp_path / "out")):
        result = CliRunner().invoke(main, ["report", target])
        assert result.exit_code == 0 and result.output.strip().endswith("_report.html"), result.output
        assert "<h1>reported</h1>" in report.read_text()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 5 and result.output.count("\n") == 1 and "no runner job here" in result.output


@pytest.fixture
def not_a_gcs():
    """An HTTP server on a free loopback port: something answers there, but not Ray. Its address."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("where", ["nothing", "not a GCS"])
@pytest.mark.parametrize("command", [["submit", "--no-progress"], ["plan", "--calibrate"]], ids=["submit", "plan"])
def test_an_address_without_a_ray_cluster_is_one_line_within_seconds(tmp_path, not_a_gcs, command, where):
    from conftest import free_port, slow_echo_job

    address = f"127.0.0.1:{free_port()}" if where == "nothing" else not_a_gcs
    path = slow_echo_job(tmp_path, "no-cluster", rows=2, step_s=0.0)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    run = subprocess.run(RUNNER + [*command, str(path), "--address", address], capture_output=True, text=True,
                         timeout=120, env=env)
    elapsed = time.time() - started
    assert run.returncode == 9, run.stderr
    assert run.stdout == "" and run.stderr.splitlines() == [{
        "nothing": f"error: --address {address}: no Ray cluster answers there (connection refused)",
        "not a GCS": f"error: --address {address}: something answers there, but not a Ray cluster's GCS (it does "
                     "not speak gRPC); the head's GCS port is 6379 unless `ray start --port` said otherwise",
    }[where]]
    assert elapsed < 30, elapsed
    assert not (tmp_path / "out").exists()  # refused before the run claimed its output location


def test_ray_client_auto_and_malformed_addresses_are_one_line(monkeypatch):
    import socket

    from conftest import free_port

    from runner.cluster import address
    from runner.errors import ClusterError

    monkeypatch.setattr(address, "GCS_PROBE_S", 1.0)
    port = free_port()
    with pytest.raises(ClusterError, match=rf"^--address ray://127\.0\.0\.1:{port}: no Ray cluster answers there "
                                           r"\(connection refused\)$"):
        address.check_address(f"ray://127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # where "auto" looks first
    with pytest.raises(ClusterError, match=rf"^--address auto \([\d.]+:{port}\): no Ray cluster answers there"):
        address.check_address("auto")
    with pytest.raises(ClusterError, match=r"^--address head: not HOST:PORT \(a head's GCS address, e\.g\. head:6379"):
        address.check_address("head")
    with socket.socket() as mute:  # accepts connections (the kernel does), never says a word
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        started = time.time()
        with pytest.raises(ClusterError, match=r"but not a Ray cluster's GCS \(no gRPC answer within 3s\)"):
            address.check_address(f"127.0.0.1:{mute.getsockname()[1]}")
        assert time.time() - started < 5


def test_a_grpc_server_that_is_not_a_gcs_is_one_line():
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from runner.cluster.address import check_address
    from runner.errors import ClusterError

    server = grpc.server(ThreadPoolExecutor(1))  # serves nothing: every method is unimplemented
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(ClusterError) as e:
            check_address(f"127.0.0.1:{port}")
    finally:
        server.stop(None)
    assert str(e.value).startswith(f"--address 127.0.0.1:{port}: something answers there, but not a Ray "
                                   "cluster's GCS (its answer to gRPC's health check: UNIMPLEMENTED ")


def test_a_real_gcs_address_passes_the_check_and_the_job_joins_it(ray_local, tmp_path):
    from conftest import slow_echo_job

    from runner.cluster.address import check_address

    gcs = ray_local.get_runtime_context().gcs_address
    started = time.time()
    check_address(gcs)
    assert time.time() - started < 1
    path = slow_echo_job(tmp_path, "joined", rows=3, step_s=0.0, num_cpus=0.5)
    run = subprocess.run(RUNNER + ["submit", "--no-progress", str(path), "--address", gcs], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["rows_ok"] == 3
