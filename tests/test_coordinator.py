from runner.coordinator import Coordinator
from runner.plan import Unit


def units(n):
    return [Unit(f"part-00000-{i:010d}", "f", i, 1, (i,), 0) for i in range(n)]


def test_hands_out_each_unit_once_then_done():
    c = Coordinator(units(3), max_attempts=2)
    got = [c.next_unit("w").unit.id for _ in range(3)]
    assert len(set(got)) == 3
    assert c.next_unit("w").state == "wait"  # all leased, none committed yet
    for uid in got:
        c.complete("w", uid, {"rows": 1})
    assert c.next_unit("w").state == "done"
    assert c.progress()["rows"] == 3 and c.progress()["finished"]


def test_lost_worker_units_go_back_and_give_up_after_attempts():
    c = Coordinator(units(2), max_attempts=2)
    a = c.next_unit("a")
    b = c.next_unit("b")
    assert c.worker_lost("a", "killed") == [a.unit.id]
    again = c.next_unit("b")
    assert again.unit.id == a.unit.id and again.attempt == 2
    c.worker_lost("b", "killed")  # second loss of a's unit: given up; b's first unit requeued
    assert [u.id for u, _ in c.given_up()] == [a.unit.id]
    retry = c.next_unit("c")
    assert retry.unit.id == b.unit.id and retry.attempt == 2
    c.complete("c", b.unit.id, {"rows": 1})
    assert c.next_unit("c").state == "done"


def test_duplicate_completion_counts_once():
    c = Coordinator(units(1), max_attempts=3)
    uid = c.next_unit("a").unit.id
    c.complete("a", uid, {"rows": 1})
    c.complete("b", uid, {"rows": 1})
    assert c.progress()["rows"] == 1


def test_failure_from_a_worker_that_no_longer_holds_the_unit_is_ignored():
    c = Coordinator(units(1), max_attempts=3)
    uid = c.next_unit("a").unit.id
    c.worker_lost("a", "gone")
    c.next_unit("b")
    c.fail("a", uid, "late report")
    assert c.progress()["units_in_flight"] == 1
