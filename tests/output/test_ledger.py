"""The ledger: one summary object plus only the new markers, on local disk and a real S3 protocol server."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import S3_KEY, S3_SECRET, slow_echo_job

from runner.cli import main
from runner.engines.base import Completion
from runner.inputs.plan import make_plan
from runner.job import finish, job_status
from runner.output import ledger as ledger_mod
from runner.output.ledger import Ledger
from runner.output.store import OutputStore, UnitStats, output_table, read_markers, summarize, unit_stats
from runner.spec.job import load_spec
from runner.storage.location import Location
from runner.storage.names import LEDGER

RUN = "run000000001"


def resume_point(loc) -> tuple[set[str], int]:
    """What a resuming driver takes from the ledger: the committed ids and the rows they failed."""
    ledger = Ledger.resume(loc)
    return ledger.committed_ids, ledger.totals().get("rows_failed", 0)


def stats(i: int, run_id: str = RUN, pool: str = "echo0") -> UnitStats:
    failed = i % 3 == 0
    return UnitStats(unit_id=f"part-00000-{i:010d}", rows=2, rows_ok=2 - failed, rows_failed=int(failed),
                     prompt_tokens=7 * i, completion_tokens=5 * i, pool=pool, worker=f"{pool}-{i % 2}",
                     run_id=run_id, started_at=1e9 + i, finished_at=1e9 + i + 0.25 * i,
                     errors={"null_prompt": 1} if failed else {}, prompt_tokens_reused=i % 4, node=f"n{i % 2}")


def mark(loc: Location, ms: list[UnitStats]) -> None:
    for m in ms:
        loc.write_json(f"_commits/{m.unit_id}.json", asdict(m))


@pytest.fixture(params=["local", "s3"])
def loc(request, tmp_path) -> Location:
    if request.param == "local":
        return Location.open(str(tmp_path / "out"))
    name, _ = request.getfixturevalue("s3_bucket")
    return Location.open(f"s3://{name}/out", {"endpoint_url": request.getfixturevalue("s3_server"),
                                              "key": S3_KEY, "secret": S3_SECRET})


@pytest.fixture
def marker_reads(monkeypatch) -> list[str]:
    """The names of the commit markers read one by one (each one GET on an object store)."""
    reads: list[str] = []
    real = Location.read_json

    def counting(self, name):
        if name.startswith("_commits/"):
            reads.append(name)
        return real(self, name)

    monkeypatch.setattr(Location, "read_json", counting)
    return reads


def test_summary_plus_new_markers_equal_every_marker(loc, marker_reads):
    mark(loc, [stats(i) for i in range(8)])
    Ledger.load(loc).roll()
    mark(loc, [stats(i, run_id="run2", pool="echo1") for i in range(8, 12)])
    marker_reads.clear()
    ledger = Ledger.load(loc)
    assert sorted(marker_reads) == [f"_commits/part-00000-{i:010d}.json" for i in range(8, 12)]
    assert ledger.markers_read == 4 and not ledger.rolled
    every = read_markers(loc)
    assert ledger.stats == every == [stats(i) for i in range(8)] + [stats(i, "run2", "echo1") for i in range(8, 12)]
    assert ledger.totals(["echo0", "echo1"], "run2") == summarize(every, ["echo0", "echo1"], "run2")
    assert ledger.totals()["rows_failed"] == 4 and ledger.totals()["errors"] == {"null_prompt": 4}


def test_summary_round_trips_every_field(loc):
    ms = [stats(i) for i in range(5)] + [replace(stats(5), errors={"timeout": 1, "bad_sampling": 1}, rows_failed=2)]
    mark(loc, ms)
    Ledger.load(loc).roll()
    assert loc.exists(LEDGER)
    table = pa.ipc.open_file(pa.BufferReader(loc.read_bytes(LEDGER))).read_all()
    assert table.schema.field("errors").type == pa.map_(pa.string(), pa.int64())
    assert table.schema.field("rows").type == pa.int64() and table.num_rows == 6
    again = Ledger.load(loc)
    assert again.stats == ms and again.markers_read == 0 and again.rolled


def test_known_stats_are_not_read(loc, marker_reads):
    mine = [stats(i) for i in range(6)]
    mark(loc, mine)
    ledger = Ledger.load(loc, known=mine[:4])
    assert sorted(marker_reads) == [f"_commits/part-00000-{i:010d}.json" for i in (4, 5)]
    marker_reads.clear()
    assert Ledger.load(loc, known=mine).stats == mine == ledger.stats
    assert marker_reads == []


def arrow_file(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("summary", [b"ARROW1 not an Arrow file at all", b"", "wrong columns", "parquet"],
                         ids=["garbage", "empty", "wrong-columns", "parquet"])
def test_an_unreadable_summary_is_rebuilt(loc, summary, caplog):
    if summary == "wrong columns":  # a readable Arrow file, but not the ledger's columns and types
        summary = arrow_file(pa.table({"unit_id": ["x"], "rows": ["many"]}))
    elif summary == "parquet":
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"unit_id": ["x"]}), buf)
        summary = buf.getvalue().to_pybytes()
    ms = [stats(i) for i in range(5)]
    mark(loc, ms)
    loc.write_bytes(LEDGER, summary)
    with caplog.at_level(logging.WARNING, logger="runner.output.ledger"):
        ledger = Ledger.load(loc)
    assert f"{loc.url}/{LEDGER}: unreadable" in caplog.text and "rebuilding it from the commit markers" in caplog.text
    assert ledger.stats == ms and ledger.markers_read == 5 and not ledger.rolled
    ledger.roll()
    assert Ledger.load(loc).markers_read == 0


def test_a_summary_row_without_a_listed_marker_is_dropped(loc):
    ms = [stats(i) for i in range(5)]
    mark(loc, ms)
    Ledger.load(loc).roll()
    loc.fs.rm_file(loc.path(f"_commits/{ms[2].unit_id}.json"))
    ledger = Ledger.load(loc)
    assert ledger.stats == ms[:2] + ms[3:] and ledger.dropped == 1 and not ledger.rolled
    assert ms[2].unit_id not in ledger.committed_ids


def test_a_unit_committed_again_after_its_marker_was_removed_is_read_afresh(loc):
    ms = [stats(i) for i in range(5)]
    mark(loc, ms)
    Ledger.load(loc).roll()
    loc.fs.rm_file(loc.path(f"_commits/{ms[2].unit_id}.json"))  # a user removes a marker to redo its unit
    done, failed = resume_point(loc)  # the resuming driver drops the row from the summary
    assert done == {m.unit_id for m in ms} - {ms[2].unit_id} and failed == 2  # units 0 and 3
    redone = replace(ms[2], run_id="run2", completion_tokens=999)
    mark(loc, [redone])
    assert Ledger.load(loc).stats == ms[:2] + [redone] + ms[3:]


def test_resume_point_rolls_only_after_many_markers(loc, monkeypatch, marker_reads):
    monkeypatch.setattr(ledger_mod, "ROLL_AFTER", 5)
    mark(loc, [stats(i) for i in range(5)])
    assert resume_point(loc) == ({stats(i).unit_id for i in range(5)}, 2)
    assert not loc.exists(LEDGER)  # 5 read: not more than ROLL_AFTER
    mark(loc, [stats(5)])
    assert resume_point(loc) == ({stats(i).unit_id for i in range(6)}, 2)
    assert loc.exists(LEDGER)
    marker_reads.clear()
    assert resume_point(loc)[1] == 2 and marker_reads == []


def test_an_empty_location_has_an_empty_ledger(loc):
    ledger = Ledger.load(loc)
    assert ledger.stats == [] and ledger.committed_ids == set() and resume_point(loc) == (set(), 0)


def committed_job(tmp_path, rows: int = 6, run_id: str = RUN):
    """An echo job.yaml of `rows` one-row units, begun and every unit committed as a worker would."""
    spec, resolved = load_spec(slow_echo_job(tmp_path, "ledger", rows, 0.0))
    plan = make_plan(spec)
    store = OutputStore(spec)
    store.begin(plan, resolved, overwrite=False)
    done = []
    for i, unit in enumerate(plan.units):
        results = [Completion(0, None, None, 3, 0, "null_prompt: no prompt") if i == 1
                   else Completion(0, f"row {i}", "stop", 3, 4 + i)]
        s = unit_stats(unit, results, pool="echo0", worker="echo0-0", run_id=run_id, started_at=1e9 + i,
                       finished_at=1e9 + i + 0.5)
        store.commit(unit, output_table(spec, unit, pa.table({"x": [None]}), results), s)
        done.append(s)
    return spec, plan, store, done


def without_timing(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("wall_time_s", "rows_per_s", "tokens_per_s")}


def test_finish_reads_none_of_its_own_markers_and_rolls(tmp_path, marker_reads):
    spec, plan, store, done = committed_job(tmp_path)
    manifest = finish(spec, store, plan, RUN, time.time(), skipped=0, known=done)
    assert marker_reads == []
    assert Ledger.load(store.loc).markers_read == 0  # rolled: the next load reads the summary only
    assert manifest["units_committed"] == 6 and manifest["rows_failed"] == 1 and manifest["status"] == "succeeded"
    (tmp_path / "out" / LEDGER).unlink()
    again = finish(spec, store, plan, RUN, time.time(), skipped=0)  # no known stats: every marker read
    assert len(marker_reads) == 6 and without_timing(again) == without_timing(manifest)
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["units_this_run"] == 6
    assert (tmp_path / "out" / "_report.html").exists()


def test_status_reads_the_summary_never_writes_it_and_prints_the_same(tmp_path, marker_reads):
    spec, plan, store, _ = committed_job(tmp_path)
    job = str(tmp_path / "job.yaml")
    before = CliRunner().invoke(main, ["status", job])
    before_json = json.loads(CliRunner().invoke(main, ["status", "--json", job]).output)
    assert before.exit_code == 0 and "incomplete; units 6/6, rows 6/6 (5 ok, 1 failed)" in before.output
    assert len(marker_reads) == 12 and not store.loc.exists(LEDGER)  # status is read-only: no roll
    finish(spec, store, plan, RUN, time.time(), skipped=0)
    marker_reads.clear()
    after = CliRunner().invoke(main, ["status", job])
    assert marker_reads == []
    assert after.output == before.output.replace("incomplete", "succeeded")
    assert job_status(spec) == {**before_json, "succeeded": True}


def test_overwrite_removes_the_ledger(tmp_path):
    _, plan, store, _ = committed_job(tmp_path)
    Ledger.load(store.loc).roll()
    assert store.loc.exists(LEDGER)
    store.begin(plan, {}, overwrite=True)
    assert not store.loc.exists(LEDGER) and Ledger.load(store.loc).stats == []
