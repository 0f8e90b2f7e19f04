"""A self-contained HTML report of an output location: throughput per pool, failed rows, slowest units."""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict

import jinja2

from runner.errors import StorageError
from runner.output.ledger import Ledger
from runner.output.store import UnitStats
from runner.storage.location import Location, storage_errors
from runner.storage.names import JOB, MANIFEST, REPORT

FAILED_POOL = "-"  # units whose every attempt failed, written by the driver
BINS = 60
GAP_SHARE = 0.1  # an idle gap between runs longer than this share of busy time is cut out of the chart
SLOWEST = 10
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 320, 70, 20, 36, 50  # chart size and margins, in px


def run_spans(markers: list[UnitStats]) -> list[tuple[str, float, float]]:
    """(run_id, first start, last finish) of each run, ordered by first start."""
    spans: dict[str, tuple[float, float]] = {}
    for m in markers:
        s, f = spans.get(m.run_id, (m.started_at, m.finished_at))
        spans[m.run_id] = (min(s, m.started_at), max(f, m.finished_at))
    return sorted(((r, s, f) for r, (s, f) in spans.items()), key=lambda x: (x[1], x[0]))


def busy_seconds(markers: list[UnitStats]) -> float:
    """Seconds covered by at least one run's span: the wall span less the idle gaps between runs."""
    busy, end = 0.0, -math.inf
    for _, s, f in run_spans(markers):
        busy += max(0.0, f - max(s, end))
        end = max(end, f)
    return busy


def compress_gaps(markers: list[UnitStats]) -> tuple[dict[str, float], list[tuple[float, str]]]:
    """Seconds to subtract from each run's times so long idle gaps vanish, and the cuts (shifted time, run_id)."""
    runs = run_spans(markers)
    limit = GAP_SHARE * busy_seconds(markers)
    shift: dict[str, float] = {}
    cuts: list[tuple[float, str]] = []
    offset, end = 0.0, runs[0][1] if runs else 0.0
    for run_id, s, f in runs:
        if s - end > limit:
            offset += s - end
            cuts.append((s - offset, run_id))
        shift[run_id] = offset
        end = max(end, f)
    return shift, cuts


def throughput_bins(spans: list[tuple[float, float, float]], t0: float, t1: float, bins: int = BINS) -> list[float]:
    """Tokens/s in each of `bins` equal bins of [t0, t1]; each (start, finish, tokens) is spread evenly over
    its interval, and one of zero duration puts all its tokens in its start's bin."""
    if t1 <= t0:
        raise ValueError(f"empty time range [{t0}, {t1}]")
    width = (t1 - t0) / bins
    tokens = [0.0] * bins

    def index(t: float) -> int:
        return min(bins - 1, max(0, int((t - t0) / width)))

    for s, f, n in spans:
        if f <= s:
            tokens[index(s)] += n
            continue
        for i in range(index(s), index(f) + 1):
            lo, hi = t0 + i * width, (t1 if i == bins - 1 else t0 + (i + 1) * width)
            tokens[i] += n * max(0.0, min(f, hi) - max(s, lo)) / (f - s)
    return [t / width for t in tokens]


def nice_ticks(top: float, n: int = 5) -> list[float]:
    """About `n` round tick values from 0 up to `top`."""
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(k * mag for k in (1, 2, 5, 10) if k * mag >= raw)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


EVENT_COLOURS = {"node lost": "#d62728", "worker lost": "#ff7f0e", "coordinator replaced": "#9467bd",
                 "node joined": "#2ca02c", "node draining": "#8c564b"}  # other kinds: grey


def chart(markers: list[UnitStats], events: list[dict] = ()) -> dict | None:
    """The throughput chart's geometry in px, with a mark for each of the cluster's `events` (the manifest's)
    that falls in its span; None when there is no time span to plot."""
    ms = [m for m in markers if m.pool != FAILED_POOL]
    if not ms:
        return None
    shift, cuts = compress_gaps(ms)
    t0 = min(m.started_at for m in ms)
    t1 = max(m.finished_at - shift[m.run_id] for m in ms)
    if t1 <= t0:
        return None
    pools = sorted({m.pool for m in ms})
    series = {p: throughput_bins([(m.started_at - shift[m.run_id], m.finished_at - shift[m.run_id],
                                   m.completion_tokens) for m in ms if m.pool == p], t0, t1) for p in pools}
    span, width = t1 - t0, (t1 - t0) / BINS
    ymax = max(max(max(v) for v in series.values()), 1.0) * 1.1

    def x(t: float) -> float:
        return round(LEFT + t / span * (W - LEFT - RIGHT), 1)

    def y(r: float) -> float:
        return round(H - BOTTOM - r / ymax * (H - TOP - BOTTOM), 1)

    return {
        "w": W, "h": H, "left": LEFT, "right": W - RIGHT, "top": TOP, "bottom": H - BOTTOM,
        "lines": [{"pool": p, "colour": COLOURS[i % len(COLOURS)],
                   "points": " ".join(f"{x((k + 0.5) * width)},{y(v)}" for k, v in enumerate(series[p]))}
                  for i, p in enumerate(pools)],
        "xticks": [(x(t), f"{t:g}") for t in nice_ticks(span)],
        "yticks": [(y(r), f"{r:g}") for r in nice_ticks(ymax)],
        "cuts": [(x(t - t0), run_id) for t, run_id in cuts],
        "events": [(x(at - t0), e["kind"], EVENT_COLOURS.get(e["kind"], "#888"), e.get("what", ""))
                   for e in events if e.get("run_id") in shift
                   and t0 <= (at := e["at"] - shift[e["run_id"]]) <= t1],
    }


def _rate(tokens: float, seconds: float) -> str:
    return f"{tokens / seconds:,.1f}" if seconds > 0 else "—"


def build_report(markers: list[UnitStats], job: dict | None, manifest: dict | None, now: float | None = None) -> str:
    """The report page: a header of totals, the throughput chart and the failure, slow-unit and pool tables."""
    job, manifest = job or {}, manifest or {}
    tokens = sum(m.completion_tokens for m in markers)
    busy = busy_seconds(markers)
    wall = max(m.finished_at for m in markers) - min(m.started_at for m in markers) if markers else 0.0
    errors = Counter()
    by_pool: dict[str, list[UnitStats]] = defaultdict(list)
    for m in markers:
        errors.update(m.errors)
        by_pool[m.pool].append(m)
    slowest = sorted(markers, key=lambda m: (m.started_at - m.finished_at, m.unit_id))[:SLOWEST]
    return _TEMPLATE.render(
        name=job.get("name") or manifest.get("name") or "runner job",
        status=manifest.get("status", "no manifest yet (running or interrupted)"),
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() if now is None else now)),
        units=len(markers), units_total=job.get("units", manifest.get("units_total", "?")),
        rows_ok=sum(m.rows_ok for m in markers), rows_failed=sum(m.rows_failed for m in markers),
        rows_total=job.get("rows", manifest.get("rows_total", "?")), tokens=tokens,
        wall=f"{wall:,.1f}", busy=f"{busy:,.1f}", runs=len(run_spans(markers)), rate=_rate(tokens, busy),
        chart=chart(markers, manifest.get("events", [])), events=_events(markers, manifest.get("events", [])),
        errors=sorted(errors.items(), key=lambda kv: (-kv[1], kv[0])),
        slowest=[(m, f"{m.finished_at - m.started_at:,.1f}", _rate(m.completion_tokens, m.finished_at - m.started_at))
                 for m in slowest],
        pools=[(p, len(ms), sum(m.rows for m in ms), sum(m.completion_tokens for m in ms),
                _rate(sum(m.completion_tokens for m in ms), busy_seconds(ms))) for p, ms in sorted(by_pool.items())],
    )


def _events(markers: list[UnitStats], events: list[dict]) -> list[tuple[str, str, str]]:
    """The cluster's events as rows: seconds since the first unit started (or the clock time), kind, what."""
    t0 = min((m.started_at for m in markers), default=None)
    return [(f"{e['at'] - t0:,.1f}" if t0 is not None else time.strftime("%H:%M:%S", time.gmtime(e["at"])),
             e["kind"], e.get("what", "")) for e in sorted(events, key=lambda e: e["at"])]


def write_report(loc: Location, markers: list[UnitStats] | None = None) -> str:
    """Write `_report.html` into the output location (from `markers`, else its ledger's); returns its URL."""
    with storage_errors(f"{loc.url}: cannot read the job record"):
        job = loc.read_json(JOB) if loc.exists(JOB) else None
        manifest = loc.read_json(MANIFEST) if loc.exists(MANIFEST) else None
    markers = Ledger.load(loc).stats if markers is None else markers
    if not markers and job is None:
        raise StorageError(f"{loc.url}: no runner job here (no {JOB}, no commit markers)")
    with storage_errors(f"{loc.url_of(REPORT)}: cannot write the report"):
        loc.write_bytes(REPORT, build_report(markers, job, manifest).encode())
    return loc.url_of(REPORT)


_TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{{ name }}: runner report</title><style>
body{font:14px sans-serif;margin:2em;color:#222} table{border-collapse:collapse;margin-bottom:1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child,th:first-child{text-align:left}
svg text{font:11px sans-serif}</style></head><body>
<h1>{{ name }}</h1>
<table id="summary">
<tr><th>status</th><td>{{ status }}</td></tr>
<tr><th>units committed</th><td>{{ units }} / {{ units_total }}</td></tr>
<tr><th>rows ok / failed</th><td>{{ rows_ok }} / {{ rows_failed }} (of {{ rows_total }})</td></tr>
<tr><th>completion tokens</th><td>{{ tokens }}</td></tr>
<tr><th>wall span</th><td>{{ wall }} s (busy {{ busy }} s over {{ runs }} run{{ "s" if runs != 1 }})</td></tr>
<tr><th>tokens/s</th><td>{{ rate }}</td></tr>
<tr><th>generated</th><td>{{ generated }}</td></tr></table>
<h2>Throughput over time</h2>
{% if chart %}{% set c = chart %}<svg xmlns="http://www.w3.org/2000/svg" width="{{ c.w }}" height="{{ c.h }}" viewBox="0 0 {{ c.w }} {{ c.h }}">
<line x1="{{ c.left }}" y1="{{ c.bottom }}" x2="{{ c.right }}" y2="{{ c.bottom }}" stroke="#000"/><line x1="{{ c.left }}" y1="{{ c.top }}" x2="{{ c.left }}" y2="{{ c.bottom }}" stroke="#000"/>
{% for x, label in c.xticks %}<line x1="{{ x }}" y1="{{ c.bottom }}" x2="{{ x }}" y2="{{ c.bottom + 5 }}" stroke="#000"/><text class="xtick" x="{{ x }}" y="{{ c.bottom + 17 }}" text-anchor="middle">{{ label }}</text>
{% endfor %}{% for y, label in c.yticks %}<line x1="{{ c.left - 5 }}" y1="{{ y }}" x2="{{ c.left }}" y2="{{ y }}" stroke="#000"/><text class="ytick" x="{{ c.left - 8 }}" y="{{ y + 4 }}" text-anchor="end">{{ label }}</text>
{% endfor %}<text x="{{ (c.left + c.right) / 2 }}" y="{{ c.h - 8 }}" text-anchor="middle">seconds since the first unit started{{ " (idle gaps between runs cut out)" if c.cuts }}</text>
<text x="14" y="{{ (c.top + c.bottom) / 2 }}" text-anchor="middle" transform="rotate(-90 14 {{ (c.top + c.bottom) / 2 }})">generated tokens/s</text>
{% for x, run_id in c.cuts %}<line class="run-boundary" x1="{{ x }}" y1="{{ c.top }}" x2="{{ x }}" y2="{{ c.bottom }}" stroke="#888" stroke-dasharray="4 3"/><text class="run-label" x="{{ x + 3 }}" y="{{ c.top + 10 }}">run {{ run_id }}</text>
{% endfor %}{% for x, kind, colour, what in c.events %}<line class="event" data-kind="{{ kind }}" x1="{{ x }}" y1="{{ c.top }}" x2="{{ x }}" y2="{{ c.bottom }}" stroke="{{ colour }}" stroke-width="1.5"><title>{{ kind }}: {{ what }}</title></line>
{% endfor %}{% for line in c.lines %}<polyline data-pool="{{ line.pool }}" fill="none" stroke="{{ line.colour }}" stroke-width="1.5" points="{{ line.points }}"/>
<rect x="{{ c.left + loop.index0 * 110 }}" y="11" width="14" height="3" fill="{{ line.colour }}"/><text class="legend" x="{{ c.left + 18 + loop.index0 * 110 }}" y="16">{{ line.pool }}</text>
{% endfor %}</svg>{% else %}<p>No timed units to plot yet.</p>{% endif %}
<h2>Cluster events</h2>
{% if events %}<table id="events"><tr><th>seconds</th><th>event</th><th>what</th></tr>
{% for at, kind, what in events %}<tr><td>{{ at }}</td><td>{{ kind }}</td><td>{{ what }}</td></tr>
{% endfor %}</table>{% else %}<p>No node or worker was lost, joined or drained.</p>{% endif %}
<h2>Failed rows by error kind</h2>
{% if errors %}<table id="errors"><tr><th>error kind</th><th>rows</th></tr>
{% for kind, n in errors %}<tr><td>{{ kind }}</td><td>{{ n }}</td></tr>
{% endfor %}</table>{% else %}<p>No failed rows.</p>{% endif %}
<h2>Slowest units</h2>
<table id="slowest"><tr><th>unit</th><th>pool</th><th>worker</th><th>attempt</th><th>rows</th><th>seconds</th><th>tokens/s</th></tr>
{% for m, secs, rate in slowest %}<tr><td>{{ m.unit_id }}</td><td>{{ m.pool }}</td><td>{{ m.worker }}</td><td>{{ m.attempt }}</td><td>{{ m.rows }}</td><td>{{ secs }}</td><td>{{ rate }}</td></tr>
{% endfor %}</table>
<h2>Pools</h2>
<table id="pools"><tr><th>pool</th><th>units</th><th>rows</th><th>completion tokens</th><th>tokens/s</th></tr>
{% for pool, n, rows, toks, rate in pools %}<tr><td>{{ pool }}</td><td>{{ n }}</td><td>{{ rows }}</td><td>{{ toks }}</td><td>{{ rate }}</td></tr>
{% endfor %}</table>
</body></html>
""")
