"""The job lock: on a local disk and on the S3 server, and two real `runner submit` of one job at once."""

import json
import socket
import subprocess
import sys
import time

import pytest

from runner.errors import JobConflictError
from runner.lock import LOCK, JobLock
from runner.storage import Location

from conftest import S3_KEY, S3_SECRET, slow_echo_job

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
