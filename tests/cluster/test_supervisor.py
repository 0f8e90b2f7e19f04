"""The supervisor on a real local Ray: a startup wave where half the replicas fail their first start, and
`replicas: auto` filling the node."""

from __future__ import annotations

import json

import duckdb
import pyarrow.parquet as pq
from conftest import slow_echo_job

from runner.cluster.ray import RunOptions
from runner.job import run_job
from runner.output.store import OutputStore
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


def test_commits_are_folded_into_the_ledger_while_the_job_runs(ray_local, tmp_path, monkeypatch):
    """With FOLD_AT 5, the driver folds the markers into ledger segments every FOLD_EVERY_S while its workers
    commit, and writes output files of a few units each as they fill: status mid-job reads segments plus a
    few markers, a reader sees files come out with no row twice, and every unit is committed once."""
    import threading
    import time

    from runner.cluster import supervisor
    from runner.job import job_status
    from runner.output import ledger
    from runner.output.store import list_markers

    monkeypatch.setattr(ledger, "FOLD_AT", 5)
    monkeypatch.setattr(supervisor, "FOLD_EVERY_S", 0.3)
    rows = 60
    output = {"path": str(tmp_path / "out"), "target_file_mb": 0.01}  # a file every few units
    spec, resolved = load_spec(slow_echo_job(tmp_path, "fold", rows, step_s=0.25, replicas=2, num_cpus=0.5,
                                             job={"output": output}))
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(run_job(spec, resolved, RunOptions(progress=False))))
    run.start()
    seen = []  # (units done by status, segments, markers standing) while the job runs
    loc = ledger.Ledger.load(OutputStore(spec).loc).loc
    read = []  # the rows a reader of the output directory saw while the job ran
    while run.is_alive():
        status = job_status(spec)
        seen.append((status["units_done"], len(loc.list("_ledger")), len(list_markers(loc))))
        read.append(duckdb.sql(f"select source_row from '{tmp_path}/out/*.parquet'").fetchall()
                    if list((tmp_path / "out").glob("*.parquet")) else [])
        time.sleep(0.2)
    run.join()
    assert result["status"] == "succeeded" and result["units_committed"] == rows
    mid = [s for s in seen if 0 < s[0] < rows and s[1] > 0]
    assert mid, seen  # status counted units from segments while the job ran
    assert max(s[2] for s in seen) < rows / 2, str(seen)  # folded markers were removed as the job went
    final = ledger.Ledger.load(loc)
    assert len(final.units) == rows and len(list_markers(loc)) < 5
    ids = sorted(pq.read_table(tmp_path / "out", columns=["source_row"]).column("source_row").to_pylist())
    assert ids == list(range(rows))
    assert job_status(spec)["units_done"] == rows
    assert any(0 < len(r) < rows for r in read), [len(r) for r in read]  # files came out while it ran
    assert all(len(set(r)) == len(r) for r in read)  # and no reader ever saw a row twice
    files = sorted(p.name for p in (tmp_path / "out").glob("*.parquet"))
    assert result["files"] == files and 3 <= len(files) < rows, files
    assert not list((tmp_path / "out" / "_parts").glob("*"))
