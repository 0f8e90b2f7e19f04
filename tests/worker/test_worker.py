"""The worker shell outside a job: its commit queue is bounded and a slow store is not a stalled engine."""

import threading
import time
from types import SimpleNamespace

from conftest import slow_echo_job

from runner.inputs.units import Unit
from runner.schedule.coordinator import Lease
from runner.spec.job import load_spec
from runner.worker.batching import END
from runner.worker.worker import COMMITS_PENDING, LEASE_AHEAD_S, LEASE_MAX, PACE_UNITS, UnitFeed, Worker


class Link:
    def __init__(self):
        self.calls = []

    def call(self, method, *args):
        self.calls.append((method, args))

    send = call


def test_finished_units_waiting_for_a_slow_store_are_bounded(ray_local, tmp_path):
    spec, _ = load_spec(slow_echo_job(tmp_path, "slow", 4, step_s=0))
    worker = Worker(spec, 0, 0, coordinator=None, run_id="r", identity="echo0-0.3")
    release, committing = threading.Event(), []

    def commit_results(unit, inputs, results, embedding_dim=0, **who):  # a store that hangs until released
        committing.append(unit.id)
        release.wait()
        return SimpleNamespace(unit_id=unit.id, completion_tokens=1)

    worker.store = SimpleNamespace(commit_results=commit_results)
    worker.engine = SimpleNamespace(embedding_dim=0)
    worker.link = Link()
    worker.loop = SimpleNamespace(owners={1: None}, last_progress=time.monotonic() - 1000)  # rows in flight
    writer = threading.Thread(target=worker._commit_loop, daemon=True)
    writer.start()
    handed = []

    def engine_loop():
        for i in range(6):
            worker._commit_later(SimpleNamespace(unit=Unit(f"u{i}", "f", i, 1, (0,), 0), inputs=None,
                                                 results=[], attempt=1, started_at=0.0))
            handed.append(i)
        worker._commit_later(None)

    loop = threading.Thread(target=engine_loop, daemon=True)
    loop.start()
    time.sleep(1.0)
    assert committing == ["u0"] and len(handed) == 1 + COMMITS_PENDING  # one in the store, two waiting
    assert worker.waiting_on_store and worker.stalled_s() == 0.0  # waiting on the store is not a stall
    release.set()
    loop.join(5)
    writer.join(5)
    assert handed == list(range(6)) and committing == [f"u{i}" for i in range(6)]
    reported = [s.unit_id for method, (_, stats) in worker.link.calls if method == "complete_all" for s in stats]
    assert reported == [f"u{i}" for i in range(6)]  # each unit reported once, in order, a few to a call
    assert worker.stalled_s() > 900  # the loop's rows have had no step for 1000 s: that is a stall


def idle_feed(lease_units):
    link = SimpleNamespace(call=lambda *args: Lease("done"))  # the feed's thread ends at once
    stub = SimpleNamespace(name="w", identity="w", draining=threading.Event())
    feed = UnitFeed(link, reader=None, worker=stub, prefetch=PACE_UNITS + 2,
                    lease_units=lease_units)
    feed.thread.join(5)
    assert feed.get(False) is END
    return feed


def test_a_fast_engine_leases_many_units_at_once_a_slow_one_as_the_pool_says():
    feed = idle_feed(lease_units=2)
    assert feed.lease_size() == 2  # nothing measured yet
    feed.unit_s = LEASE_AHEAD_S / 5  # five units in LEASE_AHEAD_S
    assert feed.lease_size() == 5
    feed.unit_s = 1e-6
    assert feed.lease_size() == 2 * LEASE_MAX
    feed.unit_s = 2.0  # a unit takes seconds: no more than the pool's lease
    assert feed.lease_size() == 2


def test_the_pace_is_taken_over_the_last_units_not_the_last_two():
    feed = idle_feed(lease_units=1)
    for i in range(PACE_UNITS + 1):
        feed.ready.put(i)
        assert feed.get(True) == i
        assert feed.lease_size() == 1 or i == PACE_UNITS  # no pace before PACE_UNITS intervals are seen
        if i % 2:
            time.sleep(0.02)  # two units at once, then a wait: an engine refilling its slots a pair at a time
    assert 0.008 < feed.unit_s < 0.05 and feed.lease_size() < LEASE_MAX


def test_a_worker_beats_each_second_only_while_its_engine_stalls():
    from runner.schedule.coordinator import IDLE_BEAT_S, STALL_BEAT_S
    from runner.worker.worker import should_beat

    assert not should_beat(0.0, 0.0, 1.0) and not should_beat(0.5, 0.2, IDLE_BEAT_S - 1)  # healthy: quiet
    assert should_beat(0.0, 0.0, IDLE_BEAT_S)  # still, at least each IDLE_BEAT_S
    assert should_beat(STALL_BEAT_S, 0.0, 1.0) and should_beat(7.0, 6.0, 1.0)  # stalling: each STALL_BEAT_S
    assert should_beat(0.0, 7.0, 1.0)  # recovered: said at once, so the coordinator stops counting the stall
