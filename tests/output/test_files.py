"""Output files of about output.target_file_mb: units wait under `_parts/`, files are written whole, and a
reader (pyarrow.dataset, DuckDB, polars) sees each row once before, while and after; a crash at each step of a
file's writing loses and duplicates nothing. On local disk and a real S3 protocol server."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from conftest import S3_KEY, S3_SECRET, slow_echo_job

from runner.engines.base import Completion
from runner.inputs.plan import make_plan
from runner.output import files as files_mod
from runner.output.files import Publisher
from runner.output.ledger import Ledger
from runner.output.store import OutputStore, output_table, unit_stats
from runner.spec.job import load_spec, parse_spec

RUN = "run000000001"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> dict:
    if request.param == "local":
        return {"path": str(tmp_path / "out")}
    name, _ = request.getfixturevalue("s3_bucket")
    return {"path": f"s3://{name}/out", "storage_options": {
        "endpoint_url": request.getfixturevalue("s3_server"), "key": S3_KEY, "secret": S3_SECRET}}


def committed(tmp_path, output: dict, units: int, target_mb: float, nulls: tuple[int, ...] = ()):
    """An echo job of `units` units of 4 rows begun, and each unit committed as a worker commits it; the
    units in `nulls` have their copied `id` column all null (as a unit whose input could not be read)."""
    path = slow_echo_job(tmp_path, "files", units * 4, 0.0, job={"unit_rows": 4})
    spec, resolved = load_spec(path)
    raw = {**resolved, "output": {**output, "target_file_mb": target_mb}}
    spec, resolved = parse_spec(raw, {})
    plan = make_plan(spec)
    store = OutputStore(spec)
    store.begin(plan, resolved, overwrite=False)
    for unit in plan.units:
        results = [Completion(r, f"text of row {unit.row_start + r} " * 20, "stop", 3, 20) for r in range(4)]
        inputs = pa.table({"x": [None] * 4})
        s = unit_stats(unit, results, pool="echo0", worker="echo0-0", run_id=RUN)
        store.commit(unit, output_table(spec, unit, inputs, results), s)
    return spec, plan, store


def rows_seen(store: OutputStore) -> dict[str, list[int]]:
    """The source rows each reader sees under the output location now, sorted."""
    loc = store.loc
    dataset = ds.dataset(loc.root, filesystem=loc.fs, format="parquet")
    seen = {"pyarrow.dataset": dataset.to_table(columns=["source_row"]).column(0).to_pylist()
            if dataset.files else []}
    if loc.url.startswith("/"):  # DuckDB and polars read the local directory by glob, as users do
        import polars as pl

        parquet = [p for p in loc.list() if p.endswith(".parquet")]
        seen["duckdb"] = ([r[0] for r in duckdb.sql(f"select source_row from '{loc.root}/*.parquet'").fetchall()]
                          if parquet else [])
        seen["polars"] = pl.scan_parquet(f"{loc.root}/*.parquet").collect()["source_row"].to_list() if parquet else []
    return {k: sorted(v) for k, v in seen.items()}


def test_units_wait_hidden_then_fill_files_of_the_target_size(tmp_path, output):
    spec, plan, store = committed(tmp_path, output, 10, target_mb=0.002)
    ledger = Ledger.load(store.loc)
    assert all(not s.file and s.part_bytes > 0 for s in ledger.stats)
    assert rows_seen(store) == dict.fromkeys(rows_seen(store), [])  # waiting parts are no reader's
    per_unit = ledger.stats[0].part_bytes
    written = Publisher(store.loc, 0.002, RUN).publish(ledger)
    per_file = -(-2000 // per_unit)  # units until a file reaches 2 KB
    assert written == [f"part-{i:05d}.parquet" for i in range(10 // per_file)]
    assert rows_seen(store) == dict.fromkeys(rows_seen(store), list(range(4 * per_file * len(written))))
    Publisher(store.loc, 0.002, RUN).publish(Ledger.load(store.loc), final=True)  # the rest, smaller
    assert rows_seen(store) == dict.fromkeys(rows_seen(store), list(range(40)))
    again = Ledger.load(store.loc)
    assert {s.file for s in again.stats} == {n for n in store.loc.list() if n.endswith(".parquet")}
    assert store.loc.list("_parts") == [] and store.loc.list("_files") == []
    assert len(store.loc.list("_commits")) == 10  # markers stand until a fold: fewer than FOLD_AT here
    again.fold(at=1)
    assert store.loc.list("_commits") == [] and Ledger.load(store.loc).stats == again.stats


@pytest.mark.parametrize("crash", ["after the intent", "after the file", "after the rows"])
def test_a_crash_at_each_step_of_a_file_loses_and_duplicates_nothing(tmp_path, output, crash, monkeypatch):
    spec, plan, store = committed(tmp_path, output, 6, target_mb=1.0)

    def killed(*_):
        raise OSError("killed")

    target = {"after the intent": (files_mod, "concatenate"), "after the file": (Ledger, "settle"),
              "after the rows": (type(store.loc), "remove")}[crash]
    with monkeypatch.context() as m:
        m.setattr(*target, killed)
        with pytest.raises(Exception, match="killed"):
            Publisher(store.loc, 1.0, RUN).publish(Ledger.load(store.loc), final=True)
    visible = [] if crash == "after the intent" else list(range(24))
    assert rows_seen(store) == dict.fromkeys(rows_seen(store), visible)  # each row once, or not yet
    assert len(store.loc.list("_files")) == 1  # the intent, for the next publisher
    assert Publisher(store.loc, 1.0, RUN).publish(Ledger.load(store.loc), final=True) == []  # all in the intent's
    assert rows_seen(store) == dict.fromkeys(rows_seen(store), list(range(24)))
    assert [n for n in store.loc.list() if n.endswith(".parquet")] == ["part-00000.parquet"]
    assert {s.file for s in Ledger.load(store.loc).stats} == {"part-00000.parquet"}
    assert store.loc.list("_parts") == [] and store.loc.list("_files") == []


@pytest.mark.parametrize("first", [False, True], ids=["middle", "first-read-alone"])
def test_a_column_null_in_one_unit_takes_its_type_from_the_others(tmp_path, monkeypatch, first):
    """Read with the others, the null column is unified at once; read first and alone (READ_AHEAD 1), the
    file is begun with it typed null, refused at the next part, and written again with every schema unified."""
    monkeypatch.setattr(files_mod, "READ_AHEAD", 1 if first else 32)
    spec, plan, store = committed(tmp_path, {"path": str(tmp_path / "out")}, 3, target_mb=1.0)
    unit = plan.units[0 if first else 1]
    results = [Completion.failed(r, "unit_failed: unreadable") for r in range(4)]
    s = unit_stats(unit, results, pool="failed", worker="failed", run_id=RUN)
    store.commit(unit, output_table(spec, unit, pa.table({"x": [None] * 4}), results), s)  # text all null
    Publisher(store.loc, 1.0, RUN).publish(Ledger.load(store.loc), final=True)
    table = ds.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert table.schema.field("text").type == pa.string() and table.num_rows == 12
    assert table.column("text").null_count == 4
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temp file left
