"""Nodes coming and going under a running job, on a real multi-node Ray cluster on this machine: a node that
joins gets replicas of a `replicas: auto` pool, a node killed whole (its raylet and workers, by their
processes' ids) has its units taken by the other replicas within seconds, and a node that Ray drains stops
taking units with nothing run twice. The driver joins the cluster by its GCS address, as `runner submit
--address HEAD:6379` does."""

from __future__ import annotations

import json
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from tests.cluster.ray_nodes import BIN, LocalCluster
from tests.conftest import slow_echo_job

NODE = ("--num-cpus=2", '--resources={"slot": 2}')
POOL = {"replicas": "auto", "num_cpus": 1, "resources": {"slot": 1}}
STEP_S = 0.25


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start_head()
        c.nodes_started = [c.add_node(*NODE), c.add_node(*NODE)]
        yield c
    finally:
        c.stop()


def submit(cluster, path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "runner"), "submit", str(path), "--no-progress", "--address",
                             f"127.0.0.1:{cluster.gcs}"], env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_commits(out, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    commits, deadline = out / "_commits", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if commits.exists() and len(list(commits.glob("*.json"))) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{n} commits not reached: {proc.communicate()[0] if proc.poll() is not None else ''}")


def finished(proc: subprocess.Popen, out) -> tuple[dict, list[dict]]:
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    rows = pq.read_table(out, columns=["source_row", "error"]).to_pylist()
    assert sorted(r["source_row"] for r in rows) == list(range(len(rows)))  # none lost, none twice
    assert all(r["error"] is None for r in rows)
    manifest = json.loads((out / "_manifest.json").read_text())
    return manifest, [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]


def test_a_node_joining_mid_job_gets_replicas_that_take_units(cluster, tmp_path):
    rows = 240
    proc = submit(cluster, slow_echo_job(tmp_path, "join", rows, step_s=STEP_S, **POOL))
    wait_commits(tmp_path / "out", 8, proc)
    joined_at = time.time()
    new = cluster.add_node(*NODE)
    cluster.nodes_started.append(new)
    manifest, markers = finished(proc, tmp_path / "out")
    assert manifest["units_committed"] == rows
    on_new = [m for m in markers if m["node"] == new]
    assert on_new, sorted({m["node"][:8] for m in markers})
    assert {m["worker"] for m in on_new} <= {f"echo0-{i}" for i in (4, 5)}  # two more replicas, one per slot
    assert [e["what"] for e in manifest["events"] if e["kind"] == "node joined"] == [new]
    first = min(m["started_at"] for m in on_new)
    print(f"node joined {joined_at:.1f}; its first unit {first - joined_at:.1f}s later; {len(on_new)} units there")


def test_a_node_killed_mid_job_has_its_units_taken_by_the_others_within_5s(cluster, tmp_path):
    rows = 240
    if len(cluster.nodes_started) < 3:  # run alone: a third node to kill
        cluster.nodes_started.append(cluster.add_node(*NODE))
    victim = cluster.procs[-1]
    victim_id = cluster.nodes_started[-1]
    proc = submit(cluster, slow_echo_job(tmp_path, "kill", rows, step_s=STEP_S, **POOL))
    out = tmp_path / "out"
    wait_commits(out, 8, proc)
    deadline = time.time() + 60
    while not any(json.loads(p.read_text())["node"] == victim_id for p in (out / "_commits").glob("*.json")):
        assert time.time() < deadline, "no unit ran on the node to be killed"
        time.sleep(0.1)
    killed_at = time.time()
    cluster.kill_node(victim)
    manifest, markers = finished(proc, out)
    assert manifest["units_committed"] == rows
    events = manifest["events"]
    lost = [e for e in events if e["kind"] == "node lost"]
    assert [e["what"] for e in lost] == [victim_id], events
    seen_s = lost[0]["at"] - killed_at
    handed = [u.strip() for e in events if e["kind"] == "worker lost" and "its node is gone" in e["what"]
              for u in e["what"].split("its units ")[1].removesuffix(" queued first").split(",") if u.strip() != "none"]
    by_id = {m["unit_id"]: m for m in markers}
    taken_s = max((by_id[u]["started_at"] - killed_at for u in handed), default=0.0)
    assert all(by_id[u]["node"] != victim_id and by_id[u]["attempt"] == 1 for u in handed)
    assert seen_s < 5 and taken_s < 5, (seen_s, taken_s, events)
    print(f"node killed: seen lost {seen_s:.2f}s later; its {len(handed)} units all running elsewhere "
          f"{taken_s:.2f}s after the kill")


def test_a_node_ray_drains_mid_job_stops_taking_units_and_nothing_runs_twice(cluster, tmp_path):
    rows = 160
    drained = cluster.nodes_started[1]
    proc = submit(cluster, slow_echo_job(tmp_path, "drain", rows, step_s=STEP_S, **POOL))
    out = tmp_path / "out"
    wait_commits(out, 8, proc)
    drain = subprocess.run([str(BIN / "ray"), "drain-node", f"--address=127.0.0.1:{cluster.gcs}",
                            f"--node-id={drained}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
                            "--reason-message=spot notice", "--deadline-remaining-seconds=120"],
                           env=cluster.env, capture_output=True, text=True, timeout=60)
    assert drain.returncode == 0, drain.stdout + drain.stderr
    drained_at = time.time()
    manifest, markers = finished(proc, out)
    assert manifest["units_committed"] == rows
    assert all(m["attempt"] == 1 for m in markers)  # nothing ran twice, no attempt charged
    assert [e["what"] for e in manifest["events"] if e["kind"] == "node draining"] == [drained]
    last_start = max((m["started_at"] for m in markers if m["node"] == drained), default=0.0)
    assert last_start < drained_at + 3, last_start - drained_at  # its units held then, at most
    after = [m for m in markers if m["started_at"] > drained_at + 3]
    assert after and all(m["node"] != drained for m in after)
