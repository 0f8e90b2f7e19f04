"""The supervisor on a real local Ray: a startup wave where half the replicas fail their first start, and
`replicas: auto` filling the node."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from conftest import slow_echo_job

from runner.cluster.ray import RunOptions
from runner.job import run_job
from runner.spec.job import load_spec


def markers(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]


def test_a_startup_wave_where_half_the_replicas_fail_their_first_start_still_finishes(ray_local, tmp_path):
    """8 replicas; the job's first 4 loads fail. They are started again after a backoff while the others take
    units: the first unit commits before the last replica is up, and every row is written once."""
    rows = 160
    path = slow_echo_job(tmp_path, "wave", rows, step_s=0.2, replicas=8, num_cpus=0.25,
                         engine_args={"load_s": 0.5, "fail_loads": 4, "fail_loads_dir": str(tmp_path / "fails")})
    spec, resolved = load_spec(path)
    result = run_job(spec, resolved, RunOptions(progress=False))
    assert result["status"] == "succeeded" and result["units_committed"] == rows
    ids = sorted(pq.read_table(tmp_path / "out", columns=["source_row"]).column("source_row").to_pylist())
    assert ids == list(range(rows))
    assert len(list((tmp_path / "fails").iterdir())) == 4
    failed = [e for e in result["events"] if e["kind"] == "replica start failed"]
    assert len(failed) == 4 and all("load " in e["what"] and "fail_loads" in e["what"] for e in failed), failed
    ms = markers(tmp_path / "out")
    first_unit = {}
    for m in ms:
        first_unit[m["worker"]] = min(first_unit.get(m["worker"], m["started_at"]), m["started_at"])
    assert len(first_unit) == 8, sorted(first_unit)  # every replica came up and took units
    first_commit = min(m["finished_at"] for m in ms)
    assert first_commit < max(first_unit.values()), (first_commit, first_unit)
    print(f"first commit {first_commit - min(first_unit.values()):.2f}s after the first start; last replica up "
          f"{max(first_unit.values()) - min(first_unit.values()):.2f}s after it")


def test_replicas_auto_starts_as_many_as_fit_up_to_max_replicas(ray_local, tmp_path):
    """The local Ray has 2 CPUs: auto at num_cpus 0.5 fits 4 replicas, max_replicas 3 caps them."""
    for cap, expected in ((None, 4), (3, 3)):
        out = tmp_path / str(cap)
        out.mkdir()
        pool = {"replicas": "auto", "num_cpus": 0.5, **({"max_replicas": cap} if cap else {})}
        spec, resolved = load_spec(slow_echo_job(out, f"auto{cap}", 48, step_s=0.1, **pool))
        result = run_job(spec, resolved, RunOptions(progress=False))
        assert result["status"] == "succeeded"
        workers = {m["worker"] for m in markers(out / "out")}
        assert workers == {f"echo0-{i}" for i in range(expected)}, workers
