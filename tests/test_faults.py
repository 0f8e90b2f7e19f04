"""Faults injected for real: a worker actor's process killed by its pid while it holds units."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from runner.job import RunOptions, run_job
from runner.spec import load_spec

from conftest import slow_echo_job


def worker_pids() -> list[int]:
    """Processes of live worker actors: Ray titles each `ray::Worker...`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(b"ray::Worker"):
                pids.append(int(entry.name))
    return pids


def test_a_worker_killed_by_pid_has_its_units_redone_elsewhere(ray_local, tmp_path):
    rows = 40
    spec, resolved = load_spec(slow_echo_job(tmp_path, "faults", rows, step_s=0.1, replicas=2, num_cpus=0.5))
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_job(spec, resolved, RunOptions(progress=False))))
    runner.start()
    commits = tmp_path / "out" / "_commits"
    deadline = time.time() + 120
    while (not commits.exists() or len(list(commits.iterdir())) < 4) and time.time() < deadline:
        time.sleep(0.05)
    victims = worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)
    runner.join(timeout=300)

    assert result["status"] == "succeeded" and result["units_committed"] == rows
    ids = pq.read_table(tmp_path / "out", columns=["source_row"]).column("source_row").to_pylist()
    assert sorted(ids) == list(range(rows))  # nothing lost, nothing twice
    markers = [json.loads(p.read_text()) for p in commits.iterdir()]
    assert any(m["attempt"] == 2 for m in markers)  # what the killed worker held was done again
