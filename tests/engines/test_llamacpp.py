import pytest

pytest.importorskip("llama_cpp")

from runner.engines.base import Request  # noqa: E402
from runner.engines.llamacpp import LlamaCppEngine  # noqa: E402
from runner.spec import Sampling  # noqa: E402

PROMPTS = [
    "Write a short summary of this review: the price was good.",
    "Answer the question: is the quality of this product bad?",
    "List three words about the service.",
    "the",
    "Describe the sound in one sentence for a user who found it great, and then explain why the "
    "battery and the screen and the size were not good for the price of this product at all.",
    "Translate: data model text",
]


def run_all(engine, requests):
    for r in requests:
        engine.add(r)
    out = {}
    while engine.has_unfinished():
        for c in engine.step():
            assert c.request_id not in out
            out[c.request_id] = c
    return out


def requests(prompts, **sampling):
    s = Sampling(**{"max_tokens": 24, **sampling})
    # uneven lengths: max_tokens differs per row so slots free and refill at different steps
    return [Request(i, p, s.model_copy(update={"max_tokens": s.max_tokens - (i % 3) * 5}))
            for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def single(tiny_model):
    engine = LlamaCppEngine(tiny_model, n_ctx=256, parallel=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(single):
    return run_all(single, requests(PROMPTS * 3))


@pytest.mark.parametrize("parallel", [4, 8, 16])
def test_batched_greedy_equals_single_sequence(tiny_model, reference, parallel):
    engine = LlamaCppEngine(tiny_model, n_ctx=256, parallel=parallel)
    try:
        got = run_all(engine, requests(PROMPTS * 3))
    finally:
        engine.close()
    assert {i: (c.text, c.finish_reason, c.completion_tokens) for i, c in got.items()} == \
           {i: (c.text, c.finish_reason, c.completion_tokens) for i, c in reference.items()}
    assert any(c.completion_tokens > 0 for c in got.values())


def test_max_tokens_and_token_counts(single):
    (c,) = run_all(single, [Request(0, PROMPTS[0], Sampling(max_tokens=5))]).values()
    assert c.error is None and c.prompt_tokens > 5
    assert (c.finish_reason == "length" and c.completion_tokens == 5) or c.finish_reason == "stop"


def test_stop_string_is_cut_and_never_in_text(single):
    (free,) = run_all(single, [Request(0, PROMPTS[1], Sampling(max_tokens=30))]).values()
    assert len(free.text) > 4
    stop = free.text[2:4]
    (cut,) = run_all(single, [Request(1, PROMPTS[1], Sampling(max_tokens=30, stop=[stop]))]).values()
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and free.text.startswith(cut.text)


def test_same_seed_same_text_other_seed_differs(single):
    def sample(seed):
        r = Request(seed, PROMPTS[2], Sampling(max_tokens=20, temperature=1.0, seed=seed))
        return next(iter(run_all(single, [r]).values())).text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_prompt_longer_than_context_is_a_row_error(tiny_model):
    engine = LlamaCppEngine(tiny_model, n_ctx=32, parallel=2)
    try:
        out = run_all(engine, [Request(0, "word " * 100, Sampling()), Request(1, "the", Sampling(max_tokens=4))])
    finally:
        engine.close()
    assert out[0].error.startswith("prompt_too_long") and out[0].text is None
    assert out[1].error is None


def test_abort_drops_a_request(single):
    single.add(Request(0, "the", Sampling(max_tokens=50)))
    single.add(Request(1, "the", Sampling(max_tokens=3)))
    single.step()
    single.abort(0)
    seen = []
    while single.has_unfinished():
        seen += [c.request_id for c in single.step()]
    assert 0 not in seen
