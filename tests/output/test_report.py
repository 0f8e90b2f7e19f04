"""The HTML report: read from commit markers in a local output location, checked through its parsed tables and SVG."""

from __future__ import annotations

import random
from dataclasses import asdict
from html.parser import HTMLParser

import pytest

from runner.errors import StorageError
from runner.output.report import build_report, throughput_bins, write_report
from runner.output.store import UnitStats, read_markers
from runner.storage.location import Location
from runner.storage.names import REPORT

T = 1_700_000_000.0
SCRIPT = "<script>alert(1)</script>"


def unit(uid: str, pool: str, run: str, start: float, secs: float, tokens: int, errors: dict | None = None,
         rows: int = 10) -> UnitStats:
    failed = sum((errors or {}).values())
    return UnitStats(unit_id=uid, rows=rows, rows_ok=rows - failed, rows_failed=failed, prompt_tokens=5 * rows,
                     completion_tokens=tokens, pool=pool, worker="-" if pool == "-" else f"{pool}-0", run_id=run,
                     started_at=T + start, finished_at=T + start + secs, errors=errors or {})


def markers(second_run_at: float = 10_000) -> list[UnitStats]:
    """Run r1 busy for 20 s; run r2 (a resume) busy for 10 s, `second_run_at` s after r1 began."""
    r2 = second_run_at
    return [
        unit("u01", "cpu", "r1", 0, 10, 100, {"timeout": 2}),
        unit("u02", "cpu", "r1", 5, 15, 200),
        unit("u03", "gpu", "r1", 0, 4, 400, {SCRIPT: 3}),
        unit("u04", "cpu", "r2", r2, 10, 300, {"timeout": 2}),
        unit("u05", "gpu", "r2", r2, 2, 50),
        unit("u06", "-", "r2", r2 + 5, 0, 0, {"unit_failed": 5}, rows=5),
    ]


def write_location(tmp_path, ms: list[UnitStats], job: dict | None) -> Location:
    loc = Location.open(str(tmp_path))
    for m in ms:
        loc.write_json(f"_commits/{m.unit_id}.json", asdict(m))
    if job is not None:
        loc.write_json("_job.json", job)
    return loc


class Row(list):
    header = True  # until a <td> shows up


class Page(HTMLParser):
    """Tables by id (rows of cell texts), SVG polylines and lines (attributes), and <text> contents by class."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: dict[str, list[Row]] = {}
        self.polylines: list[dict] = []
        self.lines: list[dict] = []
        self.texts: dict[str, list[str]] = {}
        self._table = self._row = self._cell = self._text = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = Row()
            self._table.append(self._row)
        elif tag in ("td", "th"):
            self._cell = []
            self._row.header &= tag == "th"
        elif tag == "polyline":
            self.polylines.append(a)
        elif tag == "line":
            self.lines.append(a)
        elif tag == "text":
            self._text = self.texts.setdefault(a.get("class", ""), [])
            self._text.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "text":
            self._text = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._text is not None:
            self._text[-1] += data

    def rows(self, table: str) -> list[list[str]]:
        """The table's rows that have <td> cells."""
        return [list(r) for r in self.tables[table] if not r.header]


@pytest.fixture
def report(tmp_path) -> tuple[str, Page]:
    loc = write_location(tmp_path, markers(), {"name": "nightly-eval", "units": 8, "rows": 80})
    url = write_report(loc)
    assert url == f"{tmp_path}/{REPORT}"
    html = (tmp_path / REPORT).read_text()
    return html, Page(html)


def test_read_markers_round_trips(tmp_path):
    loc = write_location(tmp_path, markers(), None)
    loc.write_bytes("_commits/.u07.json.tmp123", b"{half")  # a write in flight is not a marker
    assert read_markers(loc) == markers()


def test_header_names_the_job_and_totals(report):
    html, page = report
    assert "<h1>nightly-eval</h1>" in html
    summary = dict(page.rows("summary"))
    assert summary["units committed"] == "6 / 8"
    assert summary["rows ok / failed"] == "43 / 12 (of 80)"
    assert summary["completion tokens"] == "1050"
    assert summary["wall span"].startswith("10,010.0 s (busy 30.0 s over 2 runs)")
    assert summary["tokens/s"] == "35.0"  # 1050 tokens over 20 + 10 busy seconds, not over the idle gap
    assert summary["status"].startswith("no manifest yet")


def test_manifest_status_is_shown(tmp_path):
    loc = write_location(tmp_path, markers(), {"name": "j", "units": 6, "rows": 55})
    loc.write_json("_manifest.json", {"name": "j", "status": "failed"})
    write_report(loc)
    assert dict(Page((tmp_path / REPORT).read_text()).rows("summary"))["status"] == "failed"


def test_chart_has_one_line_per_pool_and_a_legend(report):
    html, page = report
    assert html.count("<svg") == 1
    assert sorted(p["data-pool"] for p in page.polylines) == ["cpu", "gpu"]  # the failed units' "-" is not drawn
    assert len({p["stroke"] for p in page.polylines}) == 2
    assert all(len(p["points"].split()) == 60 for p in page.polylines)
    assert sorted(page.texts["legend"]) == ["cpu", "gpu"]


def test_chart_is_self_contained(report):
    html, _ = report
    assert "<script" not in html and "<link" not in html and "src=" not in html
    assert html.count("http") == 1 and 'xmlns="http://www.w3.org/2000/svg"' in html


def test_long_idle_gap_between_runs_is_cut_and_marked(report):
    _, page = report
    boundaries = [ln for ln in page.lines if ln.get("class") == "run-boundary"]
    assert len(boundaries) == 1 and boundaries[0]["stroke-dasharray"]
    assert page.texts["run-label"] == ["run r2"]
    # 30 busy seconds plotted back to back, not 10,010 s of mostly nothing
    assert max(float(t) for t in page.texts["xtick"]) == 30


def test_short_gap_between_runs_is_kept(tmp_path):
    loc = write_location(tmp_path, markers(second_run_at=22), {"name": "j", "units": 6, "rows": 55})
    write_report(loc)  # a 2 s gap, under 10% of the 30 busy seconds
    page = Page((tmp_path / REPORT).read_text())
    assert not [ln for ln in page.lines if ln.get("class") == "run-boundary"]
    assert "run-label" not in page.texts


def test_failed_rows_by_kind_descending_and_escaped(report):
    html, page = report
    assert page.rows("errors") == [["unit_failed", "5"], ["timeout", "4"], [SCRIPT, "3"]]
    assert SCRIPT not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_no_failed_rows(tmp_path):
    html = build_report([unit("u01", "cpu", "r1", 0, 10, 100)], None, None)
    assert "No failed rows" in html and 'id="errors"' not in html


def test_slowest_units_first(report):
    _, page = report
    rows = page.rows("slowest")
    assert [r[0] for r in rows] == ["u02", "u01", "u04", "u03", "u05", "u06"]
    assert rows[0] == ["u02", "cpu", "cpu-0", "1", "10", "15.0", "13.3"]
    assert rows[-1][-1] == "—"  # zero seconds: no rate


def test_slowest_units_are_at_most_ten():
    ms = [unit(f"u{i:02}", "cpu", "r1", i, i, 10 * i) for i in range(1, 16)]
    rows = Page(build_report(ms, None, None)).rows("slowest")
    assert [r[0] for r in rows] == [f"u{i:02}" for i in range(15, 5, -1)]


def test_pool_table(report):
    _, page = report
    pools = {r[0]: r[1:] for r in page.rows("pools")}
    assert pools["cpu"] == ["3", "30", "600", "20.0"]  # 600 tokens over 20 s (r1) + 10 s (r2)
    assert pools["gpu"] == ["2", "20", "450", "75.0"]  # 450 tokens over 4 s + 2 s
    assert pools["-"] == ["1", "5", "0", "—"]


def test_empty_location_is_refused(tmp_path):
    with pytest.raises(StorageError, match=f"{tmp_path}: no runner job here"):
        write_report(Location.open(str(tmp_path)))
    assert not (tmp_path / REPORT).exists()


def test_job_record_without_markers_still_reports(tmp_path):
    write_report(write_location(tmp_path, [], {"name": "fresh", "units": 3, "rows": 30}))
    html = (tmp_path / REPORT).read_text()
    assert "<h1>fresh</h1>" in html and "No timed units to plot" in html
    assert dict(Page(html).rows("summary"))["units committed"] == "0 / 3"


def test_bins_spread_tokens_evenly():
    rates = throughput_bins([(0.0, 10.0, 100)], 0.0, 60.0, bins=60)
    assert rates[:10] == pytest.approx([10.0] * 10) and rates[10:] == [0.0] * 50


def test_bins_split_partial_overlaps():
    assert throughput_bins([(0.5, 2.5, 20)], 0.0, 4.0, bins=4) == pytest.approx([5.0, 10.0, 5.0, 0.0])


def test_bins_zero_duration_goes_to_its_bin():
    rates = throughput_bins([(5.5, 5.5, 30), (60.0, 60.0, 6)], 0.0, 60.0, bins=60)
    assert rates[5] == 30.0 and rates[59] == 6.0 and sum(rates) == 36.0


def test_bins_conserve_tokens():
    rng = random.Random(7)
    spans = []
    for _ in range(200):
        s = rng.uniform(0, 900)
        spans.append((s, s + rng.choice([0.0, rng.uniform(0, 100)]), rng.randint(0, 5000)))
    t0, t1 = min(s for s, _, _ in spans), max(f for _, f, _ in spans)
    rates = throughput_bins(spans, t0, t1, bins=60)
    assert sum(r * (t1 - t0) / 60 for r in rates) == pytest.approx(sum(n for _, _, n in spans), rel=1e-9)


def test_bins_refuse_an_empty_range():
    with pytest.raises(ValueError):
        throughput_bins([(1.0, 1.0, 5)], 1.0, 1.0)



def test_the_clusters_events_are_marked_on_the_timeline_and_listed(tmp_path):
    loc = write_location(tmp_path, markers(), {"name": "j", "units": 6, "rows": 55})
    events = [{"at": T + 3, "kind": "node lost", "what": "n1", "run_id": "r1"},
              {"at": T + 3.5, "kind": "worker lost", "what": "cpu-1: its node is gone", "run_id": "r1"},
              {"at": T + 10_004, "kind": "node joined", "what": "n2", "run_id": "r2"},
              {"at": T + 10_004.5, "kind": "coordinator replaced", "what": SCRIPT, "run_id": "r2"},
              {"at": T + 99_999, "kind": "node lost", "what": "after the span", "run_id": "r2"}]
    loc.write_json("_manifest.json", {"name": "j", "status": "succeeded", "events": events})
    html = (tmp_path / REPORT).read_text() if write_report(loc) else ""
    page = Page(html)
    marks = [ln for ln in page.lines if ln.get("class") == "event"]
    assert [m["data-kind"] for m in marks] == ["node lost", "worker lost", "node joined", "coordinator replaced"]
    xs = [float(m["x1"]) for m in marks]
    assert xs[0] < xs[1] < xs[2] < xs[3]  # the second run's events are shifted with its units past the cut
    run_boundary = float(next(ln for ln in page.lines if ln.get("class") == "run-boundary")["x1"])
    assert xs[1] < run_boundary < xs[2]
    rows = page.rows("events")
    assert [r[1] for r in rows] == ["node lost", "worker lost", "node joined", "coordinator replaced", "node lost"]
    assert rows[0][0] == "3.0" and SCRIPT in rows[3][2] and SCRIPT not in html  # escaped


def test_no_events_says_so(report):
    html, page = report
    assert "events" not in page.tables and "No node or worker was lost, joined or drained." in html
