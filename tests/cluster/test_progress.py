"""Where a run's seconds went: phases in order, one line, logged at INFO only when asked for."""

import logging
import sys

import pytest

from runner.cluster.progress import Timings


def test_phases_add_up_to_the_total_and_overlapping_ones_count_once(monkeypatch, caplog):
    t = Timings()
    t.marks = [("", 100.0)]
    t.mark("plan", 101.0)
    t.mark("ray start", 103.5)
    t.mark("finish", 103.0)  # ended while Ray started: no time of its own
    t.mark("ray stop", 104.0)
    assert t.line() == "timings: plan 1.00s, ray start 2.50s, finish 0.00s, ray stop 0.50s; total 4.00s"
    caplog.set_level(logging.DEBUG, logger="runner.cluster.progress")
    monkeypatch.delenv("RUNNER_TIMINGS", raising=False)
    t.log()
    monkeypatch.setenv("RUNNER_TIMINGS", "1")
    t.log()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.INFO]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process's start is read from /proc")
def test_the_first_phase_starts_with_the_process():
    import psutil

    # psutil's boot time is whole seconds, so the two agree to about a second
    assert abs(Timings().marks[0][1] - psutil.Process().create_time()) < 1.5
