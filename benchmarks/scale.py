"""How many replicas one coordinator serves: the real Coordinator, driven as workers drive it, by simulated
replicas that lease a unit, work a while, commit it (`complete_all`), lease again, and beat as a healthy worker does
(each IDLE_BEAT_S).

    python benchmarks/scale.py                                   # in-process, then the Ray actor, ~4 minutes
    python benchmarks/scale.py --replicas 100,300,1000 --period 10 --seconds 20 --saturate 200
    python benchmarks/scale.py --modes inproc --profile          # where the coordinator's CPU goes

inproc: the Coordinator object called directly, one call at a time; each call is timed, and the CPU a load of
R replicas committing every `--period` s would cost is projected from the per-call costs (no Ray in it).
actor: the Coordinator as a Ray actor started as runner.cluster.ray starts it (num_cpus=0, named, with the
job's metrics), called by `--generators` async Ray actors that simulate the replicas, while this process polls
`progress` every second as the driver does. The coordinator's CPU is its worker process's, read with psutil.
A `--saturate` row runs that many replicas that never wait: the most commits/s the coordinator reaches.
job: whole echo jobs on a moto S3 server, the driver killed mid-job and the job resubmitted
(benchmarks/scale_job.py): wall s, leases/s, commits/s, coordinator CPU, driver RSS, status s, resume s, files.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import statistics
import time

import psutil

from runner.inputs.units import Unit, new_unit
from runner.output.store import UnitStats
from runner.schedule.coordinator import IDLE_BEAT_S, Coordinator

GOAL = (1000, 10.0, 20.0)  # the goal: 1,000 replicas committing a unit every 10 s under 20% of a core
WARMUP_S = 2.0  # the first leases come in a burst; rates and CPU are measured after this
COLUMNS = ("mode", "replicas", "units", "offered c/s", "leases/s", "commits/s", "coord CPU %", "lease p50 ms",
           "lease p99 ms", "gen CPU %")


def plan(n: int) -> list[Unit]:
    return [new_unit(0, "bench://input.parquet", i, 1, (i,)) for i in range(n)]


def stats(unit: Unit, worker: str, attempt: int) -> UnitStats:
    return UnitStats(unit_id=unit.id, rows=unit.num_rows, rows_ok=unit.num_rows, rows_failed=0, prompt_tokens=50,
                     completion_tokens=200, pool="bench", worker=worker, run_id="bench", attempt=attempt)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- in-process: the pure CPU cost of each call ----

def timed(fn, *args) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def inproc_row(replicas: int, period: float, seconds: float) -> dict:
    """Lease+commit cycles over `replicas` held units for `seconds`, plus a beat per replica and a progress."""
    units = max(10 * replicas, 200_000)
    c = Coordinator(plan(units), max_attempts=3)
    names = [f"bench-{r}" for r in range(replicas)]
    held = {w: c.next_units(w) for w in names}
    lease_s, commit_s = [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for w in names:
            lease = held[w]
            _, dt = timed(c.complete_all, w, [stats(lease.units[0], w, lease.attempts[0])])
            commit_s.append(dt)
            held[w], dt = timed(c.next_units, w, 1)
            lease_s.append(dt)
            if held[w].state != "units":
                raise RuntimeError(f"{units} units ran out; a shorter --seconds")
    beat_s = [timed(c.beat, w, 0.0)[1] for w in names]
    progress_s = [timed(c.progress)[1] for _ in range(20)]
    cycle = statistics.mean(lease_s) + statistics.mean(commit_s)
    # per second at the offered load: R/T leases and commits, R beats, and the driver's one progress poll
    projected = replicas / period * cycle + replicas / IDLE_BEAT_S * statistics.mean(beat_s) + statistics.median(
        progress_s)
    return {"mode": "inproc", "replicas": replicas, "units": units, "offered c/s": replicas / period,
            "leases/s": 1 / cycle, "commits/s": 1 / cycle, "coord CPU %": 100 * projected,
            "lease p50 ms": 1e3 * pct(lease_s, 0.5), "lease p99 ms": 1e3 * pct(lease_s, 0.99), "gen CPU %": None,
            "detail": f"us/call: lease {1e6 * statistics.mean(lease_s):.1f}, commit "
                      f"{1e6 * statistics.mean(commit_s):.1f}, beat {1e6 * statistics.mean(beat_s):.2f}, progress "
                      f"{1e6 * statistics.median(progress_s):.0f}"}


def profile_inproc(replicas: int, cycles: int) -> None:
    c = Coordinator(plan(cycles + replicas), max_attempts=3)
    names = [f"bench-{r}" for r in range(replicas)]
    held = {w: c.next_units(w) for w in names}
    prof = cProfile.Profile()
    prof.enable()
    for i in range(cycles):
        w = names[i % replicas]
        c.complete_all(w, [stats(held[w].units[0], w, 1)])
        held[w] = c.next_units(w, 1)
        c.beat(w, 0.0)
        if i % replicas == 0:
            c.progress()
    prof.disable()
    print(f"\ncProfile, in-process: {cycles} lease+commit+beat cycles over {replicas} replicas, a progress per round")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


# ---- as a Ray actor, called by async load generators ----

class LoadGen:
    """Simulated replicas in one process: each leases, works `period` s (0: not at all), commits, leases again;
    every replica beats each IDLE_BEAT_S. Counts and lease latencies are kept with their times."""

    def __init__(self, coordinator, names: list[str], period: float, seed: int, beat_s: float = IDLE_BEAT_S):
        self.c, self.names, self.period, self.beat_s = coordinator, names, period, beat_s
        self.rng = random.Random(seed)
        self.leases: list[tuple[float, float]] = []  # (when answered, seconds taken)
        self.commits: list[float] = []
        self.tasks: list[asyncio.Task] = []
        self.stopping = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._replica(w, i)) for i, w in enumerate(self.names)]
        if self.beat_s:
            self.tasks.append(loop.create_task(self._beats()))

    async def _replica(self, w: str, i: int) -> None:
        await asyncio.sleep(i / len(self.names))  # leases spread over the first second
        first = True
        while not self.stopping:
            t = time.time()
            lease = await self.c.next_units.remote(w, 1)
            self.leases.append((time.time(), time.time() - t))
            if lease.state != "units":
                await asyncio.sleep(0.2 if lease.state == "wait" else 1e9)
                continue
            if self.period:  # the first unit's work ends anywhere in a period, so commits come steadily at once
                work = self.rng.uniform(0, self.period) if first else self.period * self.rng.uniform(0.9, 1.1)
                await asyncio.sleep(work)
            first = False
            ref = self.c.complete_all.remote(w, [stats(lease.units[0], w, lease.attempts[0])])
            self.commits.append(time.time())
            if not self.period:
                await ref  # unbounded load: one commit in flight per replica
            else:
                asyncio.get_running_loop().create_task(self._acknowledged(ref))

    @staticmethod
    async def _acknowledged(ref) -> None:
        await ref

    async def _beats(self) -> None:
        chunks = [self.names[i::10] for i in range(10)]
        while not self.stopping:
            for chunk in chunks:
                for w in chunk:
                    self.c.beat.remote(w, 0.0)  # fire and forget, as Worker._beat tells it
                await asyncio.sleep(self.beat_s / len(chunks))

    async def counts(self, t0: float, t1: float) -> tuple[int, int, list[float]]:
        lat = [dt for at, dt in self.leases if t0 <= at < t1]
        return len(lat), sum(t0 <= at < t1 for at in self.commits), lat

    async def stop(self) -> None:
        self.stopping = True
        for task in self.tasks:
            task.cancel()

    async def pid(self) -> int:
        import os

        return os.getpid()


def coordinator_pid() -> int:
    """The coordinator's worker process: a descendant of this process (it started Ray) titled ray::Coordinator."""
    for _ in range(100):
        for p in psutil.Process().children(recursive=True):
            try:
                if p.cmdline() and p.cmdline()[0].startswith("ray::Coordinator"):
                    return p.pid
            except psutil.Error:
                pass
        time.sleep(0.1)
    raise RuntimeError("no ray::Coordinator process found among this process's descendants")


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def actor_row(ray, replicas: int, period: float, seconds: float, generators: int, tag: str, beat_s: float) -> dict:
    offered = replicas / period if period else None
    units = max(1, int(replicas * (1 + (WARMUP_S + seconds + 2) / period))) if period else 400_000
    coord = ray.remote(Coordinator).options(num_cpus=0, name="coordinator", namespace=f"bench-{tag}",
                                            max_restarts=0).remote(plan(units), 3, f"bench-{tag}", None, None, None)
    ray.get(coord.progress.remote())
    cpid = coordinator_pid()
    names = [f"bench-{r}" for r in range(replicas)]
    gens = [ray.remote(LoadGen).options(num_cpus=0).remote(coord, names[g::generators], period, g, beat_s)
            for g in range(generators if replicas else 0)]  # 0 replicas: the idle actor and the driver's poll
    gpids = ray.get([g.pid.remote() for g in gens])
    ray.get([g.start.remote() for g in gens])
    t_start = time.time()
    window, cpu = None, None
    while time.time() < t_start + WARMUP_S + seconds:
        ray.get(coord.progress.remote())  # the driver's poll
        if window is None and time.time() >= t_start + WARMUP_S:
            window, cpu = time.time(), (cpu_s([cpid]), cpu_s(gpids))
        time.sleep(max(0.0, 1.0 - (time.time() - t_start) % 1.0))
    t_end, cpu_end = time.time(), (cpu_s([cpid]), cpu_s(gpids))
    got = ray.get([g.counts.remote(window, t_end) for g in gens])
    ray.get([g.stop.remote() for g in gens])
    for a in (*gens, coord):
        ray.kill(a)
    span = t_end - window
    lat = [x for _, _, ls in got for x in ls]
    return {"mode": "actor", "replicas": replicas, "units": units, "offered c/s": offered,
            "leases/s": sum(n for n, _, _ in got) / span, "commits/s": sum(n for _, n, _ in got) / span,
            "coord CPU %": 100 * (cpu_end[0] - cpu[0]) / span, "lease p50 ms": 1e3 * pct(lat, 0.5),
            "lease p99 ms": 1e3 * pct(lat, 0.99), "gen CPU %": 100 * (cpu_end[1] - cpu[1]) / span}


# ---- the table ----

def cell(v) -> str:
    if v is None:
        return "unbounded"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 100 else f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def print_table(rows: list[dict]) -> None:
    cells = [[cell(r[k]) if not (k == "gen CPU %" and r["mode"] == "inproc") else "-" for k in COLUMNS]
             for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(COLUMNS)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    print(line(COLUMNS))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))
    for r in rows:
        if "detail" in r:
            print(f"  inproc R={r['replicas']}: {r['detail']}")


def verdict(rows: list[dict]) -> None:
    replicas, period, limit = GOAL
    for r in rows:
        if r["replicas"] == replicas and r["offered c/s"] == replicas / period:
            ok = "MET" if r["coord CPU %"] < limit else "NOT met"
            print(f"goal ({replicas} replicas, a commit each {period:.0f} s = {replicas / period:.0f} commits/s, "
                  f"< {limit:.0f}% of a core), {r['mode']}: {r['coord CPU %']:.1f}% -> {ok}")
    sat = [r for r in rows if r["offered c/s"] is None]
    for r in sat:
        print(f"saturation ({r['replicas']} replicas, no waiting): {r['commits/s']:,.0f} commits/s at "
              f"{r['coord CPU %']:.0f}% coordinator CPU, {r['gen CPU %']:.0f}% in the load generators")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="inproc,actor", help="comma-separated: inproc, actor, job")
    ap.add_argument("--replicas", default="0,100,300,1000",
                    help="comma-separated simulated replica counts (0: the idle coordinator, as a baseline)")
    ap.add_argument("--period", type=float, default=10.0, help="seconds each replica works on a unit")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per actor row")
    ap.add_argument("--inproc-seconds", type=float, default=2.0, help="measured seconds per in-process row")
    ap.add_argument("--saturate", type=int, default=200, help="replicas of the unbounded row (0: none)")
    ap.add_argument("--generators", type=int, default=2, help="load-generator actors")
    ap.add_argument("--beat", type=float, default=IDLE_BEAT_S,
                    help="seconds between a replica's heartbeats (a healthy worker's, IDLE_BEAT_S; 0: none)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the in-process calls")
    ap.add_argument("--job-replicas", default="8", help="job mode: comma-separated replica counts")
    ap.add_argument("--job-units", default="100000", help="job mode: comma-separated unit counts")
    ap.add_argument("--job-unit-rows", type=int, default=1, help="job mode: rows a unit")
    ap.add_argument("--seed", default="0", help="job mode: comma-separated counts of units committed (folded) "
                    "before the run, on top of --job-units")
    ap.add_argument("--kill-at", type=float, default=0.85, help="job mode: the share of units committed when "
                    "the driver is killed")
    args = ap.parse_args()
    modes, counts = args.modes.split(","), [int(x) for x in args.replicas.split(",")]
    rows = []
    if "inproc" in modes:
        rows += [inproc_row(r, args.period, args.inproc_seconds) for r in counts if r]
        if args.profile:
            profile_inproc(max(counts), 100_000)
    if "actor" in modes:
        import ray

        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        try:
            for r in counts:
                rows.append(actor_row(ray, r, args.period, args.seconds, args.generators, str(r), args.beat))
                print_table(rows[-1:])
            if args.saturate:
                rows.append(actor_row(ray, args.saturate, 0.0, args.seconds, args.generators, "sat", args.beat))
        finally:
            ray.shutdown()
    print()
    if rows:
        print_table(rows)
        verdict(rows)
    if "job" in modes:
        job_table(args)


def job_table(args) -> None:
    """The job mode's table (benchmarks/scale_job.py): real jobs on moto S3, one row per replicas x units."""
    from scale_job import JOB_COLUMNS, job_row

    rows = []
    for seeded in (int(x) for x in args.seed.split(",")):
        for units in (int(x) for x in args.job_units.split(",")):
            for replicas in (int(x) for x in args.job_replicas.split(",")):
                print(f"job: {replicas} replicas, {units:,} units of {args.job_unit_rows} rows on {seeded:,} "
                      "committed", flush=True)
                rows.append(job_row(replicas, units, args.job_unit_rows, args.kill_at, seeded))
    cells = [[cell(r[k]) for k in JOB_COLUMNS] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(JOB_COLUMNS)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    print()
    print(line(JOB_COLUMNS))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))


if __name__ == "__main__":
    main()
