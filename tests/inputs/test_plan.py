"""Planning: listing, file identities, units; a resume over changed input refused, in process and for real."""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import S3_OPTIONS, slow_echo_job, write_shard

from runner.errors import InputError, JobConflictError
from runner.inputs import listing
from runner.inputs.parquet import cut_units
from runner.inputs.plan import make_plan
from runner.inputs.units import InputFile, row_group_summary
from runner.output.store import OutputStore
from runner.spec.job import parse_spec
from runner.storage.names import JOB

RUNNER = [sys.executable, "-m", "runner.cli"]


def spec_for(path, **inp):
    raw = {"name": "j", "input": {"path": str(path), **inp}, "output": {"path": "/tmp/o"},
           "workers": [{"engine": "echo"}], "unit_rows": 100}
    return parse_spec(raw, {})[0]


def test_units_align_to_row_groups_and_split_large_ones():
    f = InputFile("f", 390, (40, 40, 40, 250, 20), 1000, "mtime:2026-01-01T00:00:00+00:00")
    units = cut_units(3, f, 100)
    assert [(u.row_start, u.num_rows, u.row_groups, u.skip) for u in units] == [
        (0, 80, (0, 1), 0), (80, 40, (2,), 0), (120, 100, (3,), 0), (220, 100, (3,), 100),
        (320, 50, (3,), 200), (370, 20, (4,), 0)]
    assert units[0].id == "part-00003-0000000000"
    assert sum(u.num_rows for u in units) == 390


def test_directory_is_listed_sorted_and_hidden_files_skipped(tmp_path):
    for name in ["b.parquet", "a.parquet", "_tmp.parquet"]:
        write_shard(tmp_path / name, ["x"] * 3)
    (tmp_path / "sub").mkdir()
    write_shard(tmp_path / "sub" / "c.parquet", ["y"])
    plan = make_plan(spec_for(tmp_path))
    assert [f.url.rsplit("/", 2)[-1] for f in plan.files] == ["a.parquet", "b.parquet", "c.parquet"]
    assert plan.total_rows == 7


def test_glob_and_empty_file(tmp_path):
    write_shard(tmp_path / "a.parquet", ["x"] * 3)
    write_shard(tmp_path / "b.parquet", [])
    plan = make_plan(spec_for(tmp_path / "*.parquet"))
    assert len(plan.files) == 2 and len(plan.units) == 1


@pytest.mark.parametrize("setup, inp, message", [
    (None, {}, "does not exist"),
    (lambda d: (d / "x.txt").write_text("hi"), {}, "no *.parquet files under"),
    (lambda d: write_shard(d / "a.parquet", ["x"]), {"prompt_column": "text"},
     "column 'text' (input.prompt_column) not found"),
    (lambda d: write_shard(d / "a.parquet", ["x"]), {"columns": ["nope"]},
     "column 'nope' (input.columns[0]) not found"),
    (lambda d: write_shard(d / "a.parquet", ["x"]), {"prompt_column": "id"}, "has type int64, expected string"),
    (lambda d: (d / "a.parquet").write_bytes(b"garbage"), {}, "not a readable Parquet file"),
])
def test_input_errors_name_the_culprit(tmp_path, setup, inp, message):
    d = tmp_path / "in"
    if setup is not None:
        d.mkdir()
        setup(d)
    with pytest.raises(InputError) as e:
        make_plan(spec_for(d, **inp))
    assert message in str(e.value)


def test_copied_column_type_must_agree_across_shards(tmp_path):
    write_shard(tmp_path / "a.parquet", ["x"], category=["c"])
    write_shard(tmp_path / "b.parquet", ["y"], category=[3])
    with pytest.raises(InputError, match=r"b.parquet: column 'category' has type int64 but .*a.parquet has string"):
        make_plan(spec_for(tmp_path, columns=["category"]))


@dataclass
class Place:
    """A job's input folder and output location, on a local disk or on the S3 server."""

    input: str
    output: str
    options: dict
    fs: object = None  # s3fs for the S3 server; None on a local disk

    def write(self, name: str, prompts: list, row_group_size: int | None = None) -> None:
        write_shard(f"{self.input}/{name}", prompts, fs=self.fs, row_group_size=row_group_size)

    def remove(self, name: str) -> None:
        (self.fs.rm_file if self.fs else os.remove)(f"{self.input}/{name}")

    def spec(self):
        raw = {"name": "j", "input": {"path": self.input, "storage_options": self.options},
               "output": {"path": self.output, "storage_options": self.options},
               "workers": [{"engine": "echo"}], "unit_rows": 100}
        return parse_spec(raw, dict(os.environ))[0]


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    if request.param == "local":
        (tmp_path / "in").mkdir()
        return Place(str(tmp_path / "in"), str(tmp_path / "out"), {})
    name, fs = request.getfixturevalue("s3_bucket")
    return Place(f"s3://{name}/in", f"s3://{name}/out", S3_OPTIONS, fs)


ROWS = [f"row {i}" for i in range(400)]


def test_a_files_identity_is_its_size_version_rows_and_row_groups_from_the_listing(place, monkeypatch):
    place.write("a.parquet", ROWS, row_group_size=50)
    monkeypatch.setattr(listing, "_info", lambda fs, path: pytest.fail(f"an info call for {path}"))
    (f,) = make_plan(place.spec()).files
    size = place.fs.size(f.url) if place.fs else os.path.getsize(f.url)
    assert f.version.startswith('etag:"' if place.fs else "mtime:20")
    assert f.identity() == {"url": f"{place.input}/a.parquet", "size": size, "version": f.version, "rows": 400,
                            "row_groups": "8×50"}


def test_row_groups_are_kept_run_length_encoded_or_hashed():
    assert row_group_summary((64,) * 6 + (16,)) == "6×64+1×16"
    assert row_group_summary(()) == "none"
    irregular = row_group_summary(range(1, 10))
    assert irregular.startswith("9 groups #") and irregular != row_group_summary(range(2, 11))


def _regroup(place):
    place.write("a.parquet", ROWS, row_group_size=64)


def _rewrite(place):
    time.sleep(0.05)  # a local mtime moves in clock ticks of a few ms
    place.write("a.parquet", [r.upper() for r in ROWS], row_group_size=50)


@pytest.mark.parametrize("change, what", [
    (_regroup, r"a\.parquet changed since the job started \(row groups 8×50 → 6×64\+1×16, size \d+ → \d+ bytes, "
               r"VERSION \S+ → \S+\)"),
    (_rewrite, r"a\.parquet changed since the job started \(VERSION \S+ → \S+\)"),  # same rows, groups and size
    (lambda place: place.write("ab.parquet", ["x"]), r"ab\.parquet appeared since the job started"),
    (lambda place: place.remove("b.parquet"), r"b\.parquet vanished since the job started"),
], ids=["regrouped", "rewritten", "added", "removed"])
def test_a_resume_over_changed_input_is_refused_in_one_line_and_overwrite_starts_over(place, change, what):
    place.write("a.parquet", ROWS, row_group_size=50)
    place.write("b.parquet", ["y"] * 3)
    spec = place.spec()
    store = OutputStore(spec)
    assert store.begin(make_plan(spec), {}, overwrite=False) is False
    change(place)
    plan = make_plan(spec)
    with pytest.raises(JobConflictError) as e:
        store.begin(plan, {}, overwrite=False)
    assert e.value.exit_code == 6
    what = what.replace("VERSION", "ETag" if place.fs else "modified")
    pattern = (rf"output\.path: {place.output} holds this job over other input: {place.input}/{what}; "
               r"use --overwrite to start over")
    assert re.fullmatch(pattern, str(e.value)), str(e.value)
    assert store.begin(plan, {}, overwrite=True) is False
    assert store.loc.read_json(JOB)["inputs"] == [f.identity() for f in plan.files]


def test_unchanged_input_resumes(place):
    place.write("a.parquet", ROWS, row_group_size=50)
    spec = place.spec()
    store = OutputStore(spec)
    assert store.begin(make_plan(spec), {}, overwrite=False) is False
    assert store.begin(make_plan(spec), {}, overwrite=False) is True


def test_a_record_from_before_file_identities_keeps_the_url_and_row_count_check(tmp_path):
    place = Place(str(tmp_path / "in"), str(tmp_path / "out"), {})
    (tmp_path / "in").mkdir()
    place.write("a.parquet", ROWS, row_group_size=50)
    spec = place.spec()
    store = OutputStore(spec)
    old = {"name": "j", "fingerprint": spec.fingerprint(), "input_fingerprint": make_plan(spec).rows_fingerprint()}
    store.loc.write_json(JOB, old)
    _regroup(place)  # same urls and row counts: what the old record can tell
    plan = make_plan(spec)
    assert store.begin(plan, {}, overwrite=False) is True
    assert store.loc.read_json(JOB)["inputs"] == [f.identity() for f in plan.files]  # checked fully from now on
    store.loc.write_json(JOB, {**old, "input_fingerprint": "0" * 16})
    with pytest.raises(JobConflictError, match="holds this job over different input files or row counts"):
        store.begin(plan, {}, overwrite=False)


def _alive(tag: str) -> list[int]:
    """Processes whose environment holds `tag`: a killed driver's, its embedded Ray's and its workers'."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and tag.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_submit_killed_then_resumed_over_regrouped_input_is_refused_and_overwrite_writes_each_row_once(tmp_path):
    """The bug: 400 rows in 50-row groups, `runner submit` killed after its first commit, the file rewritten
    in 64-row groups, submitted again: it resumed and wrote 436 rows. Now that is refused."""
    job = slow_echo_job(tmp_path, "regrouped", rows=400, step_s=0.005, prompts=ROWS, job={"unit_rows": 100})
    source = tmp_path / "in.parquet"
    write_shard(source, ROWS, row_group_size=50)
    out, tag = tmp_path / "out", uuid.uuid4().hex
    submit = RUNNER + ["submit", "--no-dashboard", "--no-progress", str(job)]
    first = subprocess.Popen(submit, start_new_session=True, env={**os.environ, "RUNNER_TEST_RUN": tag},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(out.glob("_commits/*.json")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)
    assert first.poll() is None, "the job ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its embedded Ray at once
    first.wait()
    deadline = time.time() + 30  # its workers see their raylet is gone and go too; until then they may commit
    while _alive(tag) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(tag), "a killed driver's process lives on"
    committed = len(list(out.glob("_commits/*.json")))
    assert 1 <= committed < 4

    write_shard(source, ROWS, row_group_size=64)
    refused = subprocess.run(submit, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 6, refused.stderr
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and refused.stderr.rstrip().endswith(errors[0]), refused.stderr
    assert re.fullmatch(rf"error: output\.path: {out} holds this job over other input: {source} changed since "
                        r"the job started \(row groups 8×50 → 6×64\+1×16, size \d+ → \d+ bytes, "
                        r"modified \S+ → \S+\); use --overwrite to start over", errors[0]), errors[0]

    done = subprocess.run(submit + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(out, columns=["source_row"]).column("source_row").to_pylist()  # skips the _ files
    assert sorted(rows) == list(range(400))  # each row once
    print(f"rows in 400, out {len(rows)} ({len(set(rows))} distinct source_row); "
          f"units committed before the kill: {committed}")
