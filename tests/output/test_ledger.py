"""The ledger: segments plus only the markers not yet folded in, on local disk and a real S3 protocol server."""

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
from runner.output.ledger import Ledger, summary_table
from runner.output.store import OutputStore, UnitStats, list_markers, output_table, summarize, unit_stats
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


def segments(loc) -> list[str]:
    return [n for n in loc.list(LEDGER) if n.endswith(".arrow")]


def test_segments_plus_new_markers_are_every_commit_and_folded_markers_are_removed(loc, marker_reads):
    mark(loc, [stats(i) for i in range(8)])
    assert Ledger.load(loc).fold(at=1) == 8
    assert list_markers(loc) == {} and len(segments(loc)) == 1  # the rows first, then the markers went
    mark(loc, [stats(i, run_id="run2", pool="echo1") for i in range(8, 12)])
    marker_reads.clear()
    ledger = Ledger.load(loc)
    assert sorted(marker_reads) == [f"_commits/part-00000-{i:010d}.json" for i in range(8, 12)]
    assert ledger.markers_read == 4 and ledger.waiting == 4
    every = [stats(i) for i in range(8)] + [stats(i, "run2", "echo1") for i in range(8, 12)]
    assert ledger.stats == every
    assert ledger.totals(["echo0", "echo1"], "run2") == summarize(every, ["echo0", "echo1"], "run2")
    assert ledger.totals()["rows_failed"] == 4 and ledger.totals()["errors"] == {"null_prompt": 4}


def test_a_segment_round_trips_every_field(loc):
    ms = [stats(i) for i in range(5)] + [replace(stats(5), errors={"timeout": 1, "bad_sampling": 1}, rows_failed=2)]
    mark(loc, ms)
    Ledger.load(loc).fold(at=1)
    (name,) = segments(loc)
    table = pa.ipc.open_file(pa.BufferReader(loc.read_bytes(name))).read_all()
    assert table.schema.field("errors").type == pa.map_(pa.string(), pa.int64())
    assert table.schema.field("rows").type == pa.int64() and table.num_rows == 6
    again = Ledger.load(loc)
    assert again.stats == ms and again.markers_read == 0 and again.waiting == 0


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


@pytest.mark.parametrize("segment", [b"ARROW1 not an Arrow file at all", b"", "wrong columns", "parquet"],
                         ids=["garbage", "empty", "wrong-columns", "parquet"])
def test_an_unreadable_segment_is_skipped_with_a_warning(loc, segment, caplog):
    if segment == "wrong columns":  # a readable Arrow file, but not the ledger's columns and types
        segment = arrow_file(pa.table({"unit_id": ["x"], "rows": ["many"]}))
    elif segment == "parquet":
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"unit_id": ["x"]}), buf)
        segment = buf.getvalue().to_pybytes()
    ms = [stats(i) for i in range(5)]
    mark(loc, ms)
    loc.write_bytes(f"{LEDGER}/0-bad.arrow", segment)
    with caplog.at_level(logging.WARNING, logger="runner.output.ledger"):
        ledger = Ledger.load(loc)
    assert f"{loc.url}/{LEDGER}/0-bad.arrow: unreadable" in caplog.text and "run again" in caplog.text
    assert ledger.stats == ms and ledger.markers_read == 5 and ledger.waiting == 5


def test_a_crash_between_a_segment_and_its_markers_removal_counts_each_unit_once(loc, marker_reads):
    ms = [stats(i) for i in range(6)]
    mark(loc, ms)
    loc.write_arrow(f"{LEDGER}/00000000000000000001-crashed.arrow", summary_table(ms[:4]))  # then the driver died
    marker_reads.clear()
    ledger = Ledger.load(loc)
    assert ledger.stats == ms and ledger.waiting == 2 and sorted(marker_reads) == [
        f"_commits/{m.unit_id}.json" for m in ms[4:]]
    assert ledger.fold(at=1) == 2
    assert list_markers(loc) == {}  # the four left standing went with the next fold
    assert Ledger.load(loc).stats == ms


def test_a_unit_committed_again_after_its_fold_keeps_one_row_and_its_marker_goes_at_the_next_fold(loc):
    ms = [stats(i) for i in range(5)]
    mark(loc, ms)
    Ledger.load(loc).fold(at=1)
    mark(loc, [replace(ms[2], run_id="late", completion_tokens=999)])  # a worker cut off from its driver
    ledger = Ledger.load(loc)
    assert ledger.stats == ms and ledger.waiting == 0  # the folded row stands
    mark(loc, [stats(5)])
    ledger = Ledger.load(loc)
    ledger.fold(at=1)
    assert list_markers(loc) == {} and Ledger.load(loc).stats == ms + [stats(5)]


def test_folds_merge_their_segments_every_merge_at(loc, monkeypatch):
    monkeypatch.setattr(ledger_mod, "MERGE_AT", 3)
    ledger = Ledger.load(loc)
    for i in range(5):
        ms = [stats(2 * i), stats(2 * i + 1)]
        mark(loc, ms)
        ledger.add(ms)
        ledger.fold(at=2)
        assert Ledger.load(loc).stats == [stats(j) for j in range(2 * i + 2)]
    assert len(segments(loc)) == 1  # after each fold: 1, 2, then the third merged into 1, 2, merged into 1
    assert list_markers(loc) == {}


def test_resume_folds_only_once_fold_at_markers_wait(loc, monkeypatch, marker_reads):
    monkeypatch.setattr(ledger_mod, "FOLD_AT", 6)
    mark(loc, [stats(i) for i in range(5)])
    assert resume_point(loc) == ({stats(i).unit_id for i in range(5)}, 2)
    assert segments(loc) == [] and len(list_markers(loc)) == 5  # 5 wait: fewer than FOLD_AT
    mark(loc, [stats(5)])
    assert resume_point(loc) == ({stats(i).unit_id for i in range(6)}, 2)
    assert len(segments(loc)) == 1 and list_markers(loc) == {}
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


def test_finish_reads_none_of_its_own_markers_and_folds(tmp_path, marker_reads, monkeypatch):
    monkeypatch.setattr(ledger_mod, "FOLD_AT", 6)
    spec, plan, store, done = committed_job(tmp_path)
    manifest = finish(spec, store, plan, RUN, time.time(), skipped=0, known=done)
    assert marker_reads == []
    assert Ledger.load(store.loc).markers_read == 0  # folded: the next load reads the segment only
    assert manifest["units_committed"] == 6 and manifest["rows_failed"] == 1 and manifest["status"] == "succeeded"
    store.commit(plan.units[0], pa.table({"x": [1]}), done[0])  # a marker a late worker wrote again
    again = finish(spec, store, plan, RUN, time.time(), skipped=0)  # no known stats: the segment and one marker
    assert marker_reads == [] and without_timing(again) == without_timing(manifest)
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["units_this_run"] == 6
    assert (tmp_path / "out" / "_report.html").exists()


def test_status_reads_the_ledger_never_writes_it_and_prints_the_same(tmp_path, marker_reads, monkeypatch):
    spec, plan, store, _ = committed_job(tmp_path)
    job = str(tmp_path / "job.yaml")
    before = CliRunner().invoke(main, ["status", job])
    before_json = json.loads(CliRunner().invoke(main, ["status", "--json", job]).output)
    assert before.exit_code == 0 and "incomplete; units 6/6, rows 6/6 (5 ok, 1 failed)" in before.output
    assert len(marker_reads) == 12 and segments(store.loc) == []  # status is read-only: no fold
    monkeypatch.setattr(ledger_mod, "FOLD_AT", 6)
    finish(spec, store, plan, RUN, time.time(), skipped=0)
    marker_reads.clear()
    after = CliRunner().invoke(main, ["status", job])
    assert marker_reads == []
    assert after.output == before.output.replace("incomplete", "succeeded")
    assert job_status(spec) == {**before_json, "succeeded": True}


def test_overwrite_removes_the_ledger(tmp_path):
    _, plan, store, _ = committed_job(tmp_path)
    Ledger.load(store.loc).fold(at=1)
    assert len(segments(store.loc)) == 1
    store.begin(plan, {}, overwrite=True)
    assert segments(store.loc) == [] and Ledger.load(store.loc).stats == []
