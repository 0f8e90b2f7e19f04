"""The job lock and the conditional writes under it: on a local disk and on the S3 server, and real
`runner submit`s of one job at once."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import S3_KEY, S3_SECRET, slow_echo_job

from runner.errors import JobConflictError, RunnerError
from runner.output.lock import JobLock, lock_periods
from runner.storage.location import Location
from runner.storage.names import LOCK

RUNNER = [sys.executable, "-m", "runner.cli"]


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return Location.open(str(tmp_path / "out"))
    name, _ = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_server")
    return Location.open(f"s3://{name}/out", {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": endpoint})


def test_a_held_lock_refuses_a_second_driver_until_released(location):
    first = JobLock(location, "j", "run-a")
    first.acquire()
    busy = r"is in use by run run-a of job 'j' \(pid \d+ on .*heartbeat \d+s ago\)"
    with pytest.raises(JobConflictError, match=busy):
        JobLock(location, "j", "run-b").acquire()
    first.release()
    assert not location.exists(LOCK)
    with JobLock(location, "j", "run-b"):
        assert location.read_json(LOCK)["run_id"] == "run-b"


def test_the_heartbeat_keeps_the_lock_fresh(location):
    with JobLock(location, "j", "run-a", heartbeat_s=0.2):
        first = location.read_json(LOCK)["heartbeat"]
        time.sleep(0.7)
        assert location.read_json(LOCK)["heartbeat"] > first


@pytest.mark.parametrize("held, age, why", [
    ({"host": "another-host", "pid": 1}, 3600, "no heartbeat for"),
    ({"host": socket.gethostname()}, 0, "is gone"),  # pid filled in below
])
def test_a_dead_drivers_lock_is_taken_over(location, held, age, why, caplog):
    if "pid" not in held:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        held = {**held, "pid": gone.pid}
    location.write_json(LOCK, {"job": "j", "run_id": "dead", "heartbeat": time.time() - age, **held})
    with JobLock(location, "j", "run-b"):
        assert location.read_json(LOCK)["run_id"] == "run-b"
    assert why in caplog.text and "taking over the lock of run dead" in caplog.text


def test_two_submits_of_one_job_at_once(tmp_path):
    path = slow_echo_job(tmp_path, "twice", rows=12, step_s=0.5)
    first = subprocess.Popen(RUNNER + ["submit", "--no-dashboard", "--no-progress", str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "out" / "_job.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    second = subprocess.run(RUNNER + ["submit", "--no-dashboard", "--no-progress", "--overwrite", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 6, second.stderr
    assert second.stderr.startswith(f"error: output.path: {tmp_path / 'out'} is in use by run ")
    assert len(second.stderr.strip().splitlines()) == 1
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["units_committed"] == 12 and not (tmp_path / "out" / LOCK).exists()


def test_a_conditional_create_refuses_a_second_creator(location):
    assert location.create("x.json", b"first")
    assert not location.create("x.json", b"second")
    assert location.read_bytes("x.json") == b"first"


def test_a_conditional_replace_or_remove_needs_the_version_read(location):
    location.create("x.json", b"one")
    _, one = location.read_versioned("x.json")
    assert location.replace_if("x.json", b"two", one)
    data, two = location.read_versioned("x.json")
    assert data == b"two" and two != one
    assert not location.replace_if("x.json", b"three", one)  # written since `one` was read
    assert not location.remove_if("x.json", one)
    assert location.read_bytes("x.json") == b"two"
    assert location.remove_if("x.json", two)
    assert not location.exists("x.json")
    assert not location.replace_if("x.json", b"four", two) and not location.exists("x.json")


def race(n: int, attempt) -> list:
    """`attempt(i)` on n threads released at once; their results (or errors) in thread order."""
    start, results = threading.Barrier(n), [None] * n

    def run(i):
        start.wait()
        try:
            results[i] = attempt(i)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.mark.parametrize("write", ["create", "replace_if"])
def test_of_racing_conditional_writes_exactly_one_wins(location, write):
    if write == "replace_if":
        location.create("x.json", b"old")
    _, version = location.read_versioned("x.json") if write == "replace_if" else (None, None)
    attempt = {"create": lambda i: location.create("x.json", b"%d" % i),
               "replace_if": lambda i: location.replace_if("x.json", b"%d" % i, version)}[write]
    results = race(6, attempt)
    assert sorted(results, key=str) == [False] * 5 + [True], results
    assert location.read_bytes("x.json") == b"%d" % results.index(True)


def stale_lock(location, run_id="dead"):
    location.write_json(LOCK, {"job": "j", "run_id": run_id, "host": "another-host", "pid": 1,
                               "heartbeat": time.time() - 3600})


def test_two_drivers_taking_over_one_stale_lock_at_once_leave_one_holder(location):
    for round in range(3):
        stale_lock(location)
        locks = [JobLock(location, "j", f"run-{round}-{i}") for i in range(2)]
        results = race(2, lambda i, locks=locks: locks[i].acquire())
        won = [i for i, r in enumerate(results) if r is None]
        assert len(won) == 1, results
        assert isinstance(results[1 - won[0]], JobConflictError)
        assert location.read_json(LOCK)["run_id"] == f"run-{round}-{won[0]}"
        locks[won[0]].release()
        assert not location.exists(LOCK)


def test_a_takeover_read_back_in_a_losers_put_back_moment_still_wins(tmp_path, monkeypatch):
    """On a local disk, the driver that lost a takeover race renames the new lock away to compare it and
    puts it back: the winner's read-back in that moment finds no lock, and must wait for it, not back off."""
    location = Location.open(str(tmp_path / "out"))
    stale_lock(location)
    winner = JobLock(dataclasses.replace(location), "j", "run-a")
    real = winner.loc.replace_if
    lock_file = tmp_path / "out" / LOCK
    away = tmp_path / "out" / ".lock-away"

    def then_a_loser_compares(*args):
        wrote = real(*args)
        os.rename(lock_file, away)  # the loser's replace takes the name away ...
        threading.Timer(0.1, os.rename, (away, lock_file)).start()  # ... and puts it back
        return wrote

    monkeypatch.setattr(winner.loc, "replace_if", then_a_loser_compares)
    winner.acquire()
    assert location.read_json(LOCK)["run_id"] == "run-a"
    winner.release()


@pytest.mark.parametrize("late_in", ["read_versioned", "replace_if"])
def test_a_heartbeat_late_past_a_takeover_loses_the_lock(location, late_in, monkeypatch):
    """A driver whose heartbeat stalls (in its read, or between its read and its write) past stale_s finds
    the lock taken over: it stops beating and check() raises one line; the new holder keeps the lock."""
    late = JobLock(dataclasses.replace(location), "j", "run-a", heartbeat_s=0.2, stale_s=1.0)
    late.acquire()
    stalled, resume = threading.Event(), threading.Event()
    real = getattr(late.loc, late_in)

    def stall(*args):
        stalled.set()
        resume.wait(30)
        return real(*args)

    monkeypatch.setattr(late.loc, late_in, stall)
    assert stalled.wait(5)
    time.sleep(1.3)  # the lock's last heartbeat is now over stale_s old
    new = JobLock(location, "j", "run-b", heartbeat_s=0.2, stale_s=1.0)
    new.acquire()
    resume.set()
    assert late.lost.wait(5)
    with pytest.raises(JobConflictError) as e:
        late.check()
    why = str(e.value)
    assert why.startswith(f"output.path: {location.url}: the lock was taken over by run run-b (pid {os.getpid()} ")
    assert "heartbeat was late" in why and why.endswith("this run stops") and "\n" not in why
    assert e.value.exit_code == 6
    late.release()  # leaves the new holder's lock alone
    time.sleep(0.6)  # the new holder's heartbeats go on
    assert location.read_json(LOCK)["run_id"] == "run-b" and not new.lost.is_set()
    new.check()
    new.release()
    assert not location.exists(LOCK)


def test_a_store_without_conditional_writes_keeps_write_then_read_back():
    location = Location.open(f"memory://lock-{uuid.uuid4().hex}/out")
    with JobLock(location, "j", "run-a", heartbeat_s=0.2):
        with pytest.raises(JobConflictError, match="is in use by run run-a"):
            JobLock(location, "j", "run-b").acquire()
        first = location.read_json(LOCK)["heartbeat"]
        time.sleep(0.5)
        assert location.read_json(LOCK)["heartbeat"] > first
    assert not location.exists(LOCK)


def test_the_lock_periods_come_from_the_arguments_then_the_environment(monkeypatch):
    monkeypatch.setenv("RUNNER_LOCK_HEARTBEAT_S", "0.5")
    monkeypatch.setenv("RUNNER_LOCK_STALE_S", "3")
    assert lock_periods() == (0.5, 3.0)
    assert lock_periods(1.0, 5.0) == (1.0, 5.0)
    monkeypatch.setenv("RUNNER_LOCK_STALE_S", "soon")
    with pytest.raises(RunnerError, match="RUNNER_LOCK_STALE_S='soon': not a number of seconds"):
        lock_periods()
    monkeypatch.setenv("RUNNER_LOCK_STALE_S", "0.2")
    with pytest.raises(RunnerError, match="must be positive and shorter than stale_s"):
        lock_periods()


def lock_holder(lock) -> str | None:
    try:
        return json.loads(lock.read_text())["run_id"]
    except (FileNotFoundError, ValueError):  # absent, or being replaced at this moment
        return None


def test_a_driver_frozen_past_stale_s_loses_its_lock_to_a_second_submit(tmp_path):
    """The first driver is frozen (SIGSTOP) until a second submit takes over its stale lock; thawed, it finds
    the lock taken, stops its workers and exits 6 with one line; the second finishes the job. Its workers,
    which run on meanwhile, commit nothing once the second holds the lock (fenced). The lock
    periods come from the environment, shortened. The first's Ray workers are not frozen (Ray starts its
    own sessions), so the job is slow enough that they cannot finish it meanwhile."""
    path = slow_echo_job(tmp_path, "frozen", rows=10, step_s=1.0)
    env = {**os.environ, "RUNNER_LOCK_HEARTBEAT_S": "0.5", "RUNNER_LOCK_STALE_S": "2"}
    submit = RUNNER + ["submit", "--no-dashboard", "--no-progress", str(path)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env}
    first = subprocess.Popen(submit, start_new_session=True, **pipes)  # its own group: killpg reaches the driver
    second = None
    lock, commits = tmp_path / "out" / LOCK, tmp_path / "out" / "_commits"
    deadline = time.time() + 90
    try:
        while not (commits.exists() and any(commits.iterdir())) and time.time() < deadline:
            time.sleep(0.1)  # the first is running its workers
        os.killpg(first.pid, signal.SIGSTOP)
        while lock_holder(lock) is None:  # stopped while replacing its lock: let it finish
            os.killpg(first.pid, signal.SIGCONT)
            os.killpg(first.pid, signal.SIGSTOP)
        frozen = json.loads(lock.read_text())
        time.sleep(max(0.0, frozen["heartbeat"] + 2.5 - time.time()))  # its lock is now stale
        second = subprocess.Popen(submit, **pipes)
        while lock_holder(lock) in (frozen["run_id"], None) and second.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert lock_holder(lock) not in (frozen["run_id"], None), second.communicate()
        taken_at = time.time()
        late = []  # the frozen driver's workers still run: fenced, none of them commits now
        while time.time() < taken_at + 3:
            for marker in commits.glob("*.json"):
                try:
                    m = json.loads(marker.read_text())
                except (FileNotFoundError, ValueError):
                    continue
                if m["run_id"] == frozen["run_id"] and m["finished_at"] > taken_at + 0.5:
                    late.append(m["unit_id"])
            time.sleep(0.1)
        assert not late, f"the old run's workers committed after the takeover: {sorted(set(late))}"
        os.killpg(first.pid, signal.SIGCONT)
        err = first.communicate(timeout=120)[1]
        assert first.returncode == 6, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: output.path: {tmp_path / 'out'}: the lock was taken over by run "), err
        err = second.communicate(timeout=120)[1]
        assert second.returncode == 0, err
        assert "taking over the lock of run" in err
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["units_committed"] == 10 and not lock.exists()


def refuse_conditional(method, headers):
    """A store without conditional writes that says so: 501 to a PUT or DELETE with If-None-Match or If-Match."""
    if method in ("PUT", "DELETE") and ("If-None-Match" in headers or "If-Match" in headers):
        return 501, "NotImplemented"
    return None


def test_a_job_on_a_store_refusing_conditional_writes_locks_with_plain_writes(s3_bucket, s3_proxy, tmp_path):
    """A real `runner submit` whose output store answers 501 to conditional requests: one warning, then the
    lock is created, renewed every heartbeat (0.3s) and removed with plain writes; no retries, one run."""
    import pyarrow.parquet as pq
    from conftest import S3_OPTIONS

    bucket, fs = s3_bucket
    proxy = s3_proxy(refuse_conditional)
    out = {"path": f"s3://{bucket}/out", "storage_options": S3_OPTIONS}
    path = slow_echo_job(tmp_path, "refused", rows=8, step_s=0.3, job={"output": out})
    env = {**os.environ, "TEST_S3_ENDPOINT": proxy.url, "RUNNER_LOCK_HEARTBEAT_S": "0.3"}
    started = time.time()
    run = subprocess.run(RUNNER + ["submit", "--no-dashboard", "--no-progress", str(path)], env=env,
                         capture_output=True, text=True, timeout=180)
    elapsed = time.time() - started
    assert run.returncode == 0, run.stderr
    warned = [line for line in run.stderr.splitlines() if "conditional writes" in line]
    assert warned == [f"runner: s3://{bucket}/out: the store refuses conditional writes (HTTP 501 NotImplemented "
                      "to a put_object with If-None-Match); using plain writes instead, which the job lock checks "
                      "by reading back"], run.stderr
    assert "retrying" not in run.stderr and proxy.refused == 1
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file(f"{bucket}/out/_manifest.json"))
    assert manifest["status"] == "succeeded" and manifest["units_committed"] == 8 and manifest["rows_ok"] == 8
    ids = [i for name in fs.find(f"{bucket}/out") if name.endswith(".parquet")
           for i in pq.read_table(fs.open(name, "rb")).column("source_row").to_pylist()]
    assert sorted(ids) == list(range(8))  # every row once
    assert not fs.exists(f"{bucket}/out/{LOCK}")
    assert elapsed < 60, elapsed
