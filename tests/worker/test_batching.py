import pyarrow as pa

from runner.engines.echo import EchoEngine
from runner.inputs.rows import Rows
from runner.inputs.units import Unit, UnitWork
from runner.spec.sampling import Sampling
from runner.worker.batching import END, BatchLoop


class ListFeed:
    def __init__(self, works):
        self.works = list(works)
        self.gets = []

    def get(self, block):
        self.gets.append(block)
        return self.works.pop(0) if self.works else END


def work(i, prompts):
    unit = Unit(f"u{i}", "f", 0, len(prompts), (0,), 0)
    return UnitWork(unit, 1, pa.table({"prompt": prompts}), Rows(prompts))


class SpyEngine(EchoEngine):
    def __init__(self, capacity):
        super().__init__(capacity)
        self.in_flight_at_step = []

    def step(self):
        self.in_flight_at_step.append(len(self.queue))
        return super().step()


def test_every_row_settled_once_and_bad_rows_recorded():
    done = []
    works = [work(0, ["a b", None, "  "]), work(1, []), work(2, ["x y z"])]
    BatchLoop(EchoEngine(2), ListFeed(works), done.append, Sampling(max_tokens=2)).run()
    by_id = {w.unit.id: w for w in done}
    assert sorted(by_id) == ["u0", "u1", "u2"] and len(done) == 3
    w0 = by_id["u0"].results
    assert w0[0].text == "a b" and w0[0].finish_reason == "stop"
    assert w0[1].error.startswith("null_prompt") and w0[2].error.startswith("empty_prompt")
    assert by_id["u2"].results[0].text == "x y" and done[2].results[0].finish_reason == "length"


def test_next_unit_is_admitted_before_slots_idle():
    engine = SpyEngine(capacity=4)
    works = [work(i, [f"p{i}-{j}" for j in range(6)]) for i in range(3)]
    BatchLoop(engine, ListFeed(works), lambda w: None, Sampling()).run()
    # 18 rows at 4 a step: every step but the last runs full because the next unit is admitted
    # as soon as fewer than 4 requests are in flight, yet never more than one extra unit.
    steps = engine.in_flight_at_step
    assert all(n >= 4 for n in steps[:-1]) and steps[-1] > 0
    assert max(steps) <= 4 + 6 and len(steps) == 5


def test_chat_rows_and_per_row_sampling_reach_the_engine():
    seen = []

    class Recorder(EchoEngine):
        def add(self, request):
            seen.append(request)
            super().add(request)

    chats = [[{"role": "user", "content": "one two three"}], [{"role": "user", "content": "four five"}]]
    rows = Rows(chats, samplings=[Sampling(max_tokens=1), Sampling(max_tokens=5)])
    unit = Unit("u0", "f", 0, 2, (0,), 0)
    done = []
    BatchLoop(Recorder(4), ListFeed([UnitWork(unit, 1, pa.table({"m": [1, 2]}), rows)]), done.append,
              Sampling(max_tokens=3)).run()
    assert [r.prompt for r in seen] == [None, None] and [r.messages for r in seen] == chats
    assert [r.sampling.max_tokens for r in seen] == [1, 5]
    assert [c.text for c in done[0].results] == ["one", "four five"]
