"""Faults injected for real: a worker actor's process killed by its pid while it holds units."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
from conftest import slow_echo_job, vllm_pool, write_shard

from runner.cluster.ray import RunOptions
from runner.job import run_job
from runner.spec.job import load_spec, parse_spec


def processes(title: bytes) -> list[int]:
    """Processes whose title starts with `title`: Ray titles an actor's process `ray::Class...`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().split(b"\0")[0].startswith(title):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def worker_pids() -> list[int]:
    return processes(b"ray::Worker")


def run_until_commits(spec, resolved, out: Path, commits: int, timeout: float = 120, title: bytes = b"ray::Worker",
                      running: int = 1):
    """Start the job on a thread; once `commits` units are committed and `running` of this job's processes
    titled `title` are up, return the thread, the dict that gets its manifest, those processes' pids and
    the units committed so far."""
    result: dict = {}
    others = set(processes(title))  # not this job's
    runner = threading.Thread(target=lambda: result.update(run_job(spec, resolved, RunOptions(progress=False))))
    runner.start()
    markers = out / "_commits"

    def scene() -> tuple[list[int], int]:
        return ([pid for pid in processes(title) if pid not in others],
                len(list(markers.iterdir())) if markers.exists() else 0)

    deadline = time.time() + timeout
    while time.time() < deadline and (len(scene()[0]) < running or scene()[1] < commits):
        time.sleep(0.05)
    return runner, result, *scene()


def kill_first(runner: threading.Thread, victims: list[int], ok: bool) -> None:
    """SIGKILL the first victim once `ok` says the scene is as the test needs, then wait for the job."""
    if not ok:
        runner.join(timeout=300)  # never leave the job running into the next test
    assert ok, victims
    os.kill(victims[0], signal.SIGKILL)
    runner.join(timeout=300)


def source_rows(out: Path) -> list[int]:
    return sorted(pq.read_table(out, columns=["source_row"]).column("source_row").to_pylist())


def test_a_worker_killed_by_pid_has_its_units_redone_elsewhere(ray_local, tmp_path):
    rows = 40
    spec, resolved = load_spec(slow_echo_job(tmp_path, "faults", rows, step_s=0.1, replicas=2, num_cpus=0.5))
    runner, result, victims, _ = run_until_commits(spec, resolved, tmp_path / "out", 4, running=2)
    commits = tmp_path / "out" / "_commits"
    kill_first(runner, victims, len(victims) == 2)

    assert result["status"] == "succeeded" and result["units_committed"] == rows
    ids = source_rows(tmp_path / "out")
    assert ids == list(range(rows))  # nothing lost, nothing twice
    markers = [json.loads(p.read_text()) for p in commits.iterdir()]
    assert any(m["attempt"] == 2 for m in markers)  # what the killed worker held was done again
    print(f"rows in {rows}, out {len(ids)}; units redone: {sum(m['attempt'] == 2 for m in markers)}")


def vllm_processes() -> list:
    """vLLM's engine cores and model workers alive on this machine (they title themselves VLLM::...).

    A zombie is dead: an engine this test process built and closed earlier stays one until it is reaped."""
    import psutil

    return [p for p in psutil.process_iter(["name", "status"])
            if (p.info["name"] or "").startswith("VLLM::") and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_a_vllm_replica_killed_by_pid_has_its_units_redone(ray_local, tiny_hf_model, tmp_path):
    rows = 160
    write_shard(tmp_path / "in.parquet", [f"row {i} asks for a long answer" for i in range(rows)])
    spec, resolved = parse_spec({
        "name": "vllm-faults", "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out")},
        "sampling": {"max_tokens": 64}, "unit_rows": 4, "prefetch_units": 2,
        "workers": [vllm_pool(tiny_hf_model, engine_args={"max_num_seqs": 2})]}, env={})
    runner, result, victims, at_kill = run_until_commits(spec, resolved, tmp_path / "out", 2, timeout=180)
    commits = tmp_path / "out" / "_commits"
    # vLLM's engine core and model worker lose their parent with it
    kill_first(runner, victims, len(victims) == 1 and at_kill < rows // 4)

    assert result["status"] == "succeeded" and result["units_committed"] == rows // 4
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["source_row"] for r in out) == list(range(rows))  # nothing lost, nothing twice
    assert all(r["error"] is None and r["completion_tokens"] > 0 for r in out)
    markers = [json.loads(p.read_text()) for p in commits.iterdir()]
    redone = sum(m["attempt"] == 2 for m in markers)
    assert redone >= 1  # what the killed replica held was made again by its replacement
    deadline = time.time() + 30
    while vllm_processes() and time.time() < deadline:
        time.sleep(0.2)
    assert not vllm_processes(), "a vLLM process outlived its replica"
    print(f"rows in {rows}, out {len(out)}; {at_kill} units committed at the kill, {redone} redone")


def poison_job(tmp_path: Path, rows: int, poison_row: int, **job) -> Path:
    """An echo job whose engine process crashes (a real SIGSEGV) on the row that says POISON."""
    prompts = [f"row {i} is fine" for i in range(rows)]
    prompts[poison_row] = "row POISON crashes the engine"
    return slow_echo_job(tmp_path, "poison", rows, step_s=0.02, prompts=prompts,
                         job={"unit_rows": 4, "max_attempts": 3, **job}, parallel=4, num_cpus=0.5, replicas=2,
                         engine_args={"crash_on": "POISON"})


def test_a_poison_unit_is_written_as_failed_after_its_attempts_and_the_rest_completes(ray_local, tmp_path):
    rows, poison = 40, 17
    spec, resolved = load_spec(poison_job(tmp_path, rows, poison))
    manifest = run_job(spec, resolved, RunOptions(progress=False))

    assert manifest["status"] == "succeeded" and manifest["units_committed"] == 10
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["source_row"] for r in out) == list(range(rows))  # every row once
    failed = sorted(r["source_row"] for r in out if r["error"])
    assert failed == [16, 17, 18, 19]  # the poison row's unit, and no other
    assert all(r["error"].startswith("unit_failed: after 3 attempts: worker echo0-") and
               r["error"].endswith(" crashed (SIGSEGV)") for r in out if r["error"])
    assert all(r["text"] == f"row {r['source_row']} is fine" for r in out if not r["error"])
    assert manifest["rows_failed"] == 4 and manifest["errors"] == {"unit_failed": 4}
    markers = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_commits").iterdir()]
    assert max(m["attempt"] for m in markers if m["rows_ok"]) == 2  # neighbours lost one attempt at most
    error = next(r["error"] for r in out if r["source_row"] == poison)
    print(f"rows in {rows}, out {len(out)}; failed {len(failed)}: {error[:90]}")


def test_failed_rows_over_max_failed_rows_stop_the_job_with_one_line(ray_local, tmp_path):
    from click.testing import CliRunner

    from runner.cli import main

    job = poison_job(tmp_path, 40, 5, max_failed_rows=2)
    result = CliRunner().invoke(main, ["submit", str(job), "--no-progress"])
    assert result.exit_code == 7, result.output
    assert "error: job poison: 4 of 40 rows failed, more than max_failed_rows (2)" in result.output
    assert "{'unit_failed': 4}" in result.output and "Traceback" not in result.output
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "failed" and not (tmp_path / "out" / "_SUCCESS").exists()

    job.write_text(job.read_text().replace("max_failed_rows: 2\n", "max_failed_rows: 0.2\n"))  # 4 of 40 < 8
    result = CliRunner().invoke(main, ["submit", str(job), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["status"] == "succeeded"


def marker_bytes(out: Path) -> dict[str, bytes]:
    commits = out / "_commits"
    return {p.name: p.read_bytes() for p in commits.iterdir() if p.suffix == ".json"} if commits.exists() else {}


def test_the_driver_killed_again_and_again_then_resubmitted_redoes_no_committed_unit(tmp_path):
    """SIGKILL `runner submit` at random points, three times in a row (its embedded Ray goes with it, as
    when the machine dies); then submit again. Seeded, so a failure can be replayed."""
    import random
    import subprocess
    import sys

    rng = random.Random(int(os.environ.get("RUNNER_FAULT_SEED", "5")))
    rows = 150
    job = slow_echo_job(tmp_path, "killed", rows, step_s=0.08)
    out = tmp_path / "out"
    submit = [sys.executable, "-m", "runner.cli", "submit", str(job), "--no-dashboard", "--no-progress"]
    seen: dict[str, bytes] = {}
    kills_mid_job, at_kills = 0, []
    others = set(worker_pids())  # not this test's
    for _ in range(3):
        before = len(marker_bytes(out))
        proc = subprocess.Popen(submit, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rng.random() < 0.3:  # at any moment: planning, starting Ray, placing the workers ...
            time.sleep(rng.uniform(0.2, 4.0))
        else:  # ... or while units are being committed
            target = before + rng.randint(1, 12)
            deadline = time.time() + 120
            while len(marker_bytes(out)) < target and time.time() < deadline and proc.poll() is None:
                time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole embedded Ray at once
        proc.wait()
        deadline = time.time() + 30  # its worker processes see their raylet is gone, and go too;
        while set(worker_pids()) - others and time.time() < deadline:  # until then they may still commit
            time.sleep(0.1)
        assert not set(worker_pids()) - others, "a killed driver's worker process lives on"
        now = marker_bytes(out)
        assert len(now) < rows and not (out / "_SUCCESS").exists()
        kills_mid_job += len(now) > before
        at_kills.append(len(now))
        for name, data in seen.items():
            assert now[name] == data, f"{name} was committed before a kill and written again"
        seen = now

    assert kills_mid_job >= 1
    done = subprocess.run(submit, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = marker_bytes(out)
    assert all(final[name] == data for name, data in seen.items())  # nothing committed before was redone
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["units_skipped"] == len(seen) and manifest["units_this_run"] == rows - len(seen)
    ids = pq.read_table(out, columns=["source_row"]).column("source_row").to_pylist()
    assert sorted(ids) == list(range(rows))  # every row once
    print(f"rows in {rows}, out {len(ids)}; units committed after each kill: {at_kills}")


PROXY = r"""
import socket, sys, threading
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def pipe(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
while True:
    client, _ = server.accept()
    upstream = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
"""


class Endpoint:
    """The S3 endpoint the job talks to: a port on 127.0.0.1 forwarded to moto. Stopping it (SIGKILL) leaves
    nothing listening and cuts every open connection; the objects behind it stay, as S3's do in an outage
    (moto holds them in memory, so restarting moto itself would lose the bucket)."""

    def __init__(self, port: int, target: str):
        self.port, self.target = port, target.rsplit(":", 1)[1]
        self.proc = None

    def start(self) -> None:
        import socket
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", PROXY, str(self.port), self.target])
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the endpoint did not come up")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_the_s3_endpoint_down_for_30s_mid_job_is_ridden_out(ray_local, s3_server, s3_bucket, monkeypatch):
    from conftest import S3_OPTIONS, free_port

    bucket, fs = s3_bucket
    rows, outage_s = 40, 30
    endpoint = Endpoint(free_port(), s3_server)
    endpoint.start()
    monkeypatch.setenv("TEST_S3_ENDPOINT", f"http://127.0.0.1:{endpoint.port}")  # the job's way to S3
    write_shard(f"{bucket}/in/a.parquet", [f"row {i} has a few words" for i in range(rows)], fs=fs)
    worker = {"engine": "echo", "parallel": 1, "num_cpus": 0.5, "replicas": 2, "engine_args": {"step_s": 0.1}}
    spec, resolved = parse_spec({
        "name": "outage", "unit_rows": 1, "prefetch_units": 2, "workers": [worker],
        "input": {"path": f"s3://{bucket}/in/", "storage_options": S3_OPTIONS},
        "output": {"path": f"s3://{bucket}/out/", "storage_options": S3_OPTIONS}}, env=dict(os.environ))
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_job(spec, resolved, RunOptions(progress=False))))
    started = time.time()
    runner.start()

    def committed() -> int:  # read from moto directly, not through the endpoint
        fs.invalidate_cache()
        return len(fs.find(f"{bucket}/out/_commits"))

    try:
        deadline = time.time() + 120
        while committed() < 4 and time.time() < deadline:
            time.sleep(0.1)
        endpoint.stop()
        at_stop = committed()
        time.sleep(outage_s)
        at_restart = committed()
        endpoint.start()  # the same port
        runner.join(timeout=300)
    finally:
        endpoint.stop()

    assert 4 <= at_stop < rows and at_restart == at_stop  # the job was mid-way and stalled, not done
    assert result["status"] == "succeeded" and result["units_committed"] == rows
    assert time.time() - started > outage_s
    ids = pq.read_table(f"{bucket}/out", filesystem=fs, columns=["source_row"]).column("source_row").to_pylist()
    assert sorted(ids) == list(range(rows))  # every row once
    assert result["units_this_run"] == rows
    print(f"rows in {rows}, out {len(ids)}; {at_stop} units committed when the endpoint went away, "
          f"job took {time.time() - started:.1f}s")


def test_the_coordinator_killed_by_pid_is_replaced_and_the_job_completes_exactly_once(ray_local, tmp_path, caplog):
    rows = 40
    spec, resolved = load_spec(slow_echo_job(tmp_path, "coord", rows, step_s=0.1, replicas=2, num_cpus=0.5))
    runner, result, victims, committed = run_until_commits(spec, resolved, tmp_path / "out", 4,
                                                           title=b"ray::Coordinator")
    kill_first(runner, victims, len(victims) == 1)

    assert result["status"] == "succeeded" and result["units_committed"] == rows
    assert source_rows(tmp_path / "out") == list(range(rows))  # nothing lost, nothing twice
    assert "the coordinator was lost" in caplog.text
    assert "lost (" not in caplog.text.replace("the coordinator was lost (", "")  # the workers carried on
    print(f"rows in {rows}, out {rows}; coordinator killed after {committed} commits")


def hang_job(tmp_path: Path, rows: int, hang_rows: list[int], **job) -> Path:
    """An echo job whose engine hangs for good (a deadlock, not a crash) on each row that says HANG."""
    prompts = [f"row {i} is fine" for i in range(rows)]
    for r in hang_rows:
        prompts[r] = "row HANG never finishes"
    return slow_echo_job(tmp_path, "hang", rows, step_s=0.02, prompts=prompts,
                         job={"unit_rows": 4, "max_attempts": 2, **job}, parallel=4, num_cpus=0.5, replicas=2,
                         stall_timeout_s=2, engine_args={"hang_on": "HANG"})


def test_a_stalled_engine_is_killed_and_its_unit_written_as_failed_after_its_attempts(ray_local, tmp_path):
    rows, hang = 32, 13
    spec, resolved = load_spec(hang_job(tmp_path, rows, [hang]))
    started = time.time()
    manifest = run_job(spec, resolved, RunOptions(progress=False))

    assert manifest["status"] == "succeeded" and manifest["units_committed"] == 8
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["source_row"] for r in out) == list(range(rows))  # every row once
    assert sorted(r["source_row"] for r in out if r["error"]) == [12, 13, 14, 15]
    error = next(r["error"] for r in out if r["source_row"] == hang)
    assert error.startswith("unit_failed: after 2 attempts: worker echo0-") and "stalled: its engine made no " \
                                                                              "progress for " in error, error
    print(f"rows in {rows}, out {len(out)}; {time.time() - started:.1f}s; {error[:110]}")


def test_a_job_whose_engine_stalls_on_every_row_ends_with_one_line_naming_the_pool(ray_local, tmp_path):
    from click.testing import CliRunner

    from runner.cli import main

    job = hang_job(tmp_path, 16, list(range(16)), max_attempts=2)
    started = time.time()
    result = CliRunner().invoke(main, ["submit", str(job), "--no-progress"])
    assert result.exit_code == 7, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: job hang: pool echo0 stalled: its engine made no progress for 2s "
                           "(stall_timeout_s), 3 times in a row;"), line
    assert "Traceback" not in result.output
    print(f"{time.time() - started:.1f}s: {line}")


def test_a_model_that_validates_but_cannot_load_ends_the_job_with_one_line(ray_local, tiny_model, tmp_path):
    """A GGUF whose header is whole but names an architecture llama.cpp lacks: every replica fails to load."""
    from click.testing import CliRunner

    from runner.cli import main

    data = Path(tiny_model).read_bytes()
    at = data.index(b"general.architecture") + len(b"general.architecture") + 12  # after the type and length
    assert data[at:at + 5] == b"llama"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:at] + b"llamb" + data[at + 5:])
    write_shard(tmp_path / "in.parquet", [f"hello {i}" for i in range(8)])
    job = tmp_path / "job.yaml"
    job.write_text(f"name: badmodel\ninput: {{path: {tmp_path / 'in.parquet'}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
                   f"unit_rows: 4\nworkers:\n  - {{engine: llamacpp, model: {bad}, n_ctx: 64, replicas: 2, "
                   "num_cpus: 0.5}\n")
    result = CliRunner().invoke(main, ["submit", str(job), "--no-progress"])
    assert result.exit_code == 4, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"error: pool llamacpp0: cannot load {bad}: "), line
    assert "Traceback" not in result.output and result.output.count("cannot load") == 1
    assert not list((tmp_path / "out").glob("_commits/*"))
    print(line)


def test_sigterm_to_a_worker_hands_back_what_it_has_not_started_and_no_finished_work_is_lost(ray_local, tmp_path):
    """A preemption notice: the worker takes no more units, hands back those read ahead, finishes and commits
    the one in its engine, and ends; a replacement takes over. Nothing runs twice and no attempt is charged."""
    rows = 40
    spec, resolved = load_spec(slow_echo_job(tmp_path, "notice", rows, step_s=0.2, replicas=2, num_cpus=0.5))
    runner, result, victims, _ = run_until_commits(spec, resolved, tmp_path / "out", 4, running=2)
    if len(victims) == 2:
        os.kill(victims[0], signal.SIGTERM)
    runner.join(timeout=300)
    assert len(victims) == 2, victims
    assert result["status"] == "succeeded" and result["units_committed"] == rows
    assert source_rows(tmp_path / "out") == list(range(rows))
    markers = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_commits").iterdir()]
    assert all(m["attempt"] == 1 for m in markers)
    assert [e["kind"] for e in result["events"]] == ["worker drained"], result["events"]
