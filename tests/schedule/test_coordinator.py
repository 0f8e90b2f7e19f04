import time

from runner.inputs.units import Unit
from runner.output.store import UnitStats
from runner.schedule.coordinator import IDLE_BEAT_S, Coordinator


def units(n):
    return [Unit(f"part-00000-{i:010d}", "f", i, 1, (i,), 0) for i in range(n)]


def stats(uid, pool="p", rows=1):
    return UnitStats(unit_id=uid, rows=rows, rows_ok=rows, rows_failed=0, prompt_tokens=2, completion_tokens=3,
                     pool=pool, worker="w", run_id="r")


def test_hands_out_each_unit_once_then_done():
    c = Coordinator(units(3), max_attempts=2)
    got = [c.next_units("w").units[0].id for _ in range(3)]
    assert len(set(got)) == 3
    assert c.next_units("w").state == "wait"  # all leased, none committed yet
    for uid in got:
        c.complete("w", stats(uid))
    assert c.next_units("w").state == "done"
    p = c.progress()
    assert p["rows"] == 3 and p["completion_tokens"] == 9 and p["finished"] and p["done_by_pool"] == {"p": 3}
    assert [s.unit_id for s in c.committed()] == got


def test_lost_worker_units_go_back_and_give_up_after_attempts():
    c = Coordinator(units(2), max_attempts=2)
    a = c.next_units("a")
    b = c.next_units("b")
    assert c.worker_lost("a", "killed") == [a.units[0].id]
    again = c.next_units("a2")
    assert again.units[0].id == a.units[0].id and again.attempts[0] == 2
    c.worker_lost("a2", "killed")  # second loss of a's unit: given up
    assert [u.id for u, _ in c.given_up()] == [a.units[0].id]
    assert c.progress()["rows_given_up"] == 1
    c.worker_lost("b", "killed")  # b's unit is requeued
    retry = c.next_units("c")
    assert retry.units[0].id == b.units[0].id and retry.attempts[0] == 2
    c.complete("c", stats(b.units[0].id))
    assert c.next_units("c").state == "done"


def test_duplicate_completion_counts_once():
    c = Coordinator(units(1), max_attempts=3)
    uid = c.next_units("a").units[0].id
    c.complete("a", stats(uid))
    c.complete("b", stats(uid))
    assert c.progress()["rows"] == 1 and len(c.committed()) == 1


def test_failure_from_a_worker_that_no_longer_holds_the_unit_is_ignored():
    c = Coordinator(units(1), max_attempts=3)
    uid = c.next_units("a").units[0].id
    c.worker_lost("a", "gone")
    c.next_units("b")
    c.fail("a", uid, "late report")
    assert c.progress()["units_in_flight"] == 1


def test_a_lost_workers_late_call_is_refused_and_leases_nothing():
    """A replacement has another identity; the dying actor's own late call must not take units nobody runs."""
    c = Coordinator(units(2), max_attempts=3)
    c.next_units("w-0")
    c.worker_lost("w-0", "killed")
    assert c.next_units("w-0").state == "done"
    p = c.progress()
    assert p["units_in_flight"] == 0 and p["units_queued"] == 2
    assert c.next_units("w-0.1", 2).state == "units"


def test_a_unit_committed_by_a_lost_worker_is_done():
    """Its marker is written: a late report of it counts, and the unit is not run again."""
    c = Coordinator(units(1), max_attempts=3)
    uid = c.next_units("a").units[0].id
    c.worker_lost("a", "timed out")
    c.complete("a", stats(uid))
    assert c.progress()["finished"] and c.next_units("b").state == "done"


def test_a_lease_of_several_units_takes_consecutive_units_and_each_is_retried_alone():
    c = Coordinator(units(5), max_attempts=2)
    big = c.next_units("gpu", 3)
    assert [u.row_start for u in big.units] == [0, 1, 2] and big.attempts == (1, 1, 1)
    small = c.next_units("cpu", 3)
    assert [u.row_start for u in small.units] == [3, 4]  # only what is left
    c.complete("gpu", stats(big.units[0].id))
    assert sorted(c.worker_lost("gpu", "killed")) == [big.units[1].id, big.units[2].id]
    assert c.next_units("cpu", 1).state == "wait"  # cpu still holds units: retries go to an idle worker
    again = c.next_units("gpu2", 3)
    assert [u.id for u in again.units] == [big.units[1].id] and again.attempts == (2,)


def test_retries_wait_in_their_own_queue_while_busy_workers_take_fresh_units():
    c = Coordinator(units(6), max_attempts=2)
    first = c.next_units("a", 3)
    c.next_units("b", 1)
    c.worker_lost("a", "crashed")  # three units charged one attempt each; one of them is the poison
    busy = c.next_units("b", 3)  # b holds a unit: it takes fresh ones, not a retry
    assert [u.row_start for u in busy.units] == [4, 5] and busy.attempts == (1, 1)
    alone = c.next_units("a2", 3)  # an idle worker takes the first retry, alone
    assert [u.id for u in alone.units] == [first.units[0].id] and alone.attempts == (2,)
    assert c.next_units("a2", 3).state == "wait"  # nothing more until the retry is settled
    c.complete("a2", stats(first.units[0].id))
    assert [u.id for u in c.next_units("a2", 3).units] == [first.units[1].id]
    c.worker_lost("a2", "crashed")  # the poison again: given up, and nothing else was charged
    assert [u.id for u, _ in c.given_up()] == [first.units[1].id]
    assert c.next_units("a3", 3).units == (first.units[2],)
    c.complete("a3", stats(first.units[2].id))
    assert c.next_units("a3", 3).state == "wait"  # b still runs 3, 4, 5


def test_a_replacement_coordinator_keeps_attempts_give_ups_and_what_workers_still_hold():
    old = Coordinator(units(4), max_attempts=2)
    held = old.next_units("a", 1)
    old.next_units("b", 1)
    old.worker_lost("b", "killed")
    old.next_units("c", 1)
    old.worker_lost("c", "lost: killed")  # unit 1: both attempts used, given up
    seen = old.progress()
    assert seen["gave_up"] == {"part-00000-0000000001": "worker c lost: killed"}
    assert seen["attempts"] == {"part-00000-0000000000": 1, "part-00000-0000000001": 2}

    new = Coordinator(units(4), max_attempts=2, attempts=seen["attempts"], gave_up=seen["gave_up"],
                      totals={"rows": 7, "rows_given_up": 1})
    new.adopt("a", [(held.units[0].id, 1)])  # a survived the old coordinator and still runs unit 0
    assert [u.id for u, _ in new.given_up()] == ["part-00000-0000000001"]
    p = new.progress()
    assert p["units_in_flight"] == 1 and p["units_queued"] == 2 and p["units_given_up"] == 1
    assert p["rows"] == 7 and p["rows_given_up"] == 1  # carried over, the give-up counted once
    fresh = new.next_units("d", 4)
    assert [u.row_start for u in fresh.units] == [2, 3]  # unit 0 is not handed out again
    new.worker_lost("a", "killed")
    assert new.next_units("e").attempts == (2,)  # unit 0's attempt counted from the old coordinator


def test_progress_says_how_long_each_worker_has_stalled():
    c = Coordinator(units(1), max_attempts=2)
    c.beat("a", 4.0)
    c.beat("b", 0.0)
    time.sleep(0.2)
    stalled = c.progress()["stalled_s"]
    assert 4.2 <= stalled["a"] < 5  # a stalling worker beats each STALL_BEAT_S: its silence since counts
    assert stalled["b"] == 0.0  # a healthy one beats each IDLE_BEAT_S: silence within that is not a stall
    c.beats["b"] = (time.time() - IDLE_BEAT_S - 3, 0.0)  # silent past its interval: hung whole, beats and all
    assert 3 <= c.progress()["stalled_s"]["b"] < 4
    c.worker_lost("a", "stalled")
    c.beat("a", 9.0)  # a late beat from the killed worker
    assert "a" not in c.progress()["stalled_s"]


def test_several_commits_reported_in_one_call_and_the_run_timed():
    c = Coordinator(units(3), max_attempts=2)
    lease = c.next_units("w", 3)
    c.loaded("w", 0.25)
    c.complete_all("w", [stats(u.id) for u in lease.units])
    assert c.progress()["finished"] and [s.unit_id for s in c.committed()] == [u.id for u in lease.units]
    t = c.timings()
    assert t["first_lease"] <= t["first_commit"] <= t["last_commit"] and t["load_s"] == {"w": 0.25}


def test_units_handed_back_are_queued_again_with_no_attempt_counted():
    from runner.schedule.coordinator import WorkerInfo

    c = Coordinator(units(4), max_attempts=2)
    c.starting("w1", WorkerInfo(node="n1"))
    lease = c.next_units("w1", 3)
    ids = [u.id for u in lease.units]
    assert len(ids) == 3 and lease.attempts == (1, 1, 1)
    c.hand_back("w1", ids[1:])
    c.hand_back("w2", ids[:1])  # not its to give back
    p = c.progress()
    assert p["units_in_flight"] == 1 and p["units_queued"] == 3 and p["attempts"] == {ids[0]: 1}
    again = c.next_units("w2", 4)
    assert sorted(u.id for u in again.units) == sorted(set(u.id for u in units(4)) - {ids[0]})
    assert again.attempts == (1, 1, 1)


def test_workers_on_a_draining_node_take_no_more_units():
    from runner.schedule.coordinator import WorkerInfo

    c = Coordinator(units(4), max_attempts=2)
    c.starting("a", WorkerInfo(node="n1"))
    c.starting("b", WorkerInfo(node="n2"))
    assert c.next_units("a").state == "units"
    c.drain(["n1"])
    assert c.next_units("a").state == "done"
    assert c.next_units("b").state == "units"
    assert c.workers_on(["n1"]) == ["a"] and c.workers_on(["n1", "n2"]) == ["a", "b"]
    c.worker_lost("a", "lost")
    assert c.workers_on(["n1"]) == []


def test_a_worker_lost_with_its_node_has_its_units_queued_first_with_no_attempt_counted():
    c = Coordinator(units(6), max_attempts=1)
    held = [u.id for u in c.next_units("a", 2).units]
    other = [u.id for u in c.next_units("b", 1).units]
    assert c.worker_lost("a", "lost: its node is gone", blameless=True) == sorted(held)
    p = c.progress()
    assert p["units_given_up"] == 0 and p["units_queued"] == 5 and p["attempts"] == {other[0]: 1}
    assert [u.id for u in c.next_units("c", 2).units] == held  # first in line, in plan order
    c.worker_lost("b", "crashed (SIGSEGV)")  # its own loss: its unit's one attempt is used up
    assert c.progress()["units_given_up"] == 1


def test_a_replacement_coordinator_leases_nothing_until_the_surviving_workers_adopt_what_they_hold(monkeypatch):
    new = Coordinator(units(4), max_attempts=2, awaiting=["a", "b"])
    assert new.next_units("c", 4).state == "wait"  # a and b have not said what they hold
    new.adopt("a", [("part-00000-0000000000", 1)])
    assert new.next_units("a", 4).state == "wait"  # b still may hold units
    new.adopt("b", [("part-00000-0000000002", 1)])
    assert [u.row_start for u in new.next_units("c", 4).units] == [1, 3]  # neither held unit is leased again

    lost = Coordinator(units(2), max_attempts=2, awaiting=["a", "b"])
    lost.adopt("a", [])
    lost.worker_lost("b", "lost: killed")  # lost before it adopted: nothing to wait for
    assert lost.next_units("a", 2).state == "units"

    late = Coordinator(units(2), max_attempts=2, awaiting=["a"])
    monkeypatch.setattr(time, "time", lambda: late.adopt_by + 0.1)  # a never found it: after ADOPT_WAIT_S
    assert late.next_units("c", 2).state == "units"
