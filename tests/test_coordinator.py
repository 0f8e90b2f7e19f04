from runner.coordinator import Coordinator
from runner.plan import Unit


def units(n):
    return [Unit(f"part-00000-{i:010d}", "f", i, 1, (i,), 0) for i in range(n)]


def test_hands_out_each_unit_once_then_done():
    c = Coordinator(units(3), max_attempts=2)
    got = [c.next_units("w").units[0].id for _ in range(3)]
    assert len(set(got)) == 3
    assert c.next_units("w").state == "wait"  # all leased, none committed yet
    for uid in got:
        c.complete("w", uid, {"rows": 1})
    assert c.next_units("w").state == "done"
    assert c.progress()["rows"] == 3 and c.progress()["finished"]


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
    c.complete("c", b.units[0].id, {"rows": 1})
    assert c.next_units("c").state == "done"


def test_duplicate_completion_counts_once():
    c = Coordinator(units(1), max_attempts=3)
    uid = c.next_units("a").units[0].id
    c.complete("a", uid, {"rows": 1})
    c.complete("b", uid, {"rows": 1})
    assert c.progress()["rows"] == 1


def test_failure_from_a_worker_that_no_longer_holds_the_unit_is_ignored():
    c = Coordinator(units(1), max_attempts=3)
    uid = c.next_units("a").units[0].id
    c.worker_lost("a", "gone")
    c.next_units("b")
    c.fail("a", uid, "late report")
    assert c.progress()["units_in_flight"] == 1


def test_a_lease_of_several_units_takes_consecutive_units_and_each_is_retried_alone():
    c = Coordinator(units(5), max_attempts=2)
    big = c.next_units("gpu", 3)
    assert [u.row_start for u in big.units] == [0, 1, 2] and big.attempts == (1, 1, 1)
    small = c.next_units("cpu", 3)
    assert [u.row_start for u in small.units] == [3, 4]  # only what is left
    c.complete("gpu", big.units[0].id, {"rows": 1})
    assert sorted(c.worker_lost("gpu", "killed")) == [big.units[1].id, big.units[2].id]
    assert c.next_units("cpu", 1).state == "wait"  # cpu still holds units: retries go to an idle worker
    again = c.next_units("gpu2", 3)
    assert [u.id for u in again.units] == [big.units[1].id] and again.attempts == (2,)


def test_a_retried_unit_runs_alone_so_a_poison_unit_costs_its_neighbours_one_attempt():
    c = Coordinator(units(6), max_attempts=2)
    first = c.next_units("a", 3)
    c.next_units("b", 1)
    c.worker_lost("a", "crashed")  # three units charged one attempt each; one of them is the poison
    assert c.next_units("b", 3).state == "wait"  # b holds a unit: the retry waits for an idle worker
    alone = c.next_units("a2", 3)
    assert [u.id for u in alone.units] == [first.units[0].id] and alone.attempts == (2,)
    assert c.next_units("a2", 3).state == "wait"  # nothing more until the retry is settled
    c.complete("a2", first.units[0].id, {"rows": 1})
    assert [u.id for u in c.next_units("a2", 3).units] == [first.units[1].id]
    c.worker_lost("a2", "crashed")  # the poison again: given up, and nothing else was charged
    assert [u.id for u, _ in c.given_up()] == [first.units[1].id]
    assert c.next_units("a3", 3).units == (first.units[2],)
    c.complete("a3", first.units[2].id, {"rows": 1})
    fresh = c.next_units("a3", 3)
    assert [u.row_start for u in fresh.units] == [4, 5] and fresh.attempts == (1, 1)
