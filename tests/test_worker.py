"""The worker shell outside a job: its commit queue is bounded and a slow store is not a stalled engine."""

import threading
import time
from types import SimpleNamespace

from runner.plan import Unit
from runner.spec import load_spec
from runner.worker import COMMITS_PENDING, Worker

from conftest import slow_echo_job


class Link:
    def __init__(self):
        self.calls = []

    def call(self, method, *args):
        self.calls.append((method, args))


def test_finished_units_waiting_for_a_slow_store_are_bounded(ray_local, tmp_path):
    spec, _ = load_spec(slow_echo_job(tmp_path, "slow", 4, step_s=0))
    worker = Worker(spec, 0, 0, coordinator=None, run_id="r", identity="echo0-0.3")
    release, committing = threading.Event(), []

    def commit_results(unit, inputs, results, **who):  # a store that hangs until released
        committing.append(unit.id)
        release.wait()
        return SimpleNamespace(unit_id=unit.id, completion_tokens=1)

    worker.store = SimpleNamespace(commit_results=commit_results)
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
    assert [c[0] for c in worker.link.calls] == ["complete"] * 6
    assert worker.stalled_s() > 900  # the loop's rows have had no step for 1000 s: that is a stall
