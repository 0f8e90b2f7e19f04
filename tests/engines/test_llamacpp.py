import pytest

pytest.importorskip("llama_cpp")

from conftest import run_all  # noqa: E402

from runner.engines.base import Request  # noqa: E402
from runner.engines.llamacpp.generate import LlamaCppEngine  # noqa: E402
from runner.spec.sampling import Sampling  # noqa: E402

PROMPTS = [
    "Write a short summary of this review: the price was good.",
    "Answer the question: is the quality of this product bad?",
    "List three words about the service.",
    "the",
    "Describe the sound in one sentence for a user who found it great, and then explain why the "
    "battery and the screen and the size were not good for the price of this product at all.",
    "Translate: data model text",
]


def requests(prompts, **sampling):
    s = Sampling(**{"max_tokens": 24, **sampling})
    # uneven lengths: max_tokens differs per row so slots free and refill at different steps
    return [Request(i, p, s.model_copy(update={"max_tokens": s.max_tokens - (i % 3) * 5}))
            for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def reference(single):
    return run_all(single, requests(PROMPTS * 3))


@pytest.mark.parametrize("parallel,unified", [(4, False), (8, False), (16, False), (8, True)])
def test_batched_greedy_equals_single_sequence(tiny_model, reference, parallel, unified):
    engine = LlamaCppEngine(tiny_model, n_ctx=256, parallel=parallel, kv_unified=unified, prefix_reuse=False)
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


SYSTEM = ("You are a careful assistant. Answer the question about the product review below in one short "
          "sentence, and say if the price and the quality were good or bad for the user.\n")
OTHER = "Translate the text below and then list the words of it, one word a line, for the data model:\n"


def shared_prefix_requests():
    """Two groups with different long heads, interleaved, so the engine must switch prefixes."""
    rows = [(SYSTEM if i % 4 else OTHER) + p for i, p in enumerate(PROMPTS * 4)]
    return requests(rows)


def outputs(got):
    return {i: (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) for i, c in got.items()}


@pytest.fixture(scope="module")
def prefix_reference(single):
    return run_all(single, shared_prefix_requests())


@pytest.mark.parametrize("parallel,unified", [(4, False), (8, True)])
def test_prefix_reuse_gives_the_same_outputs(tiny_model, prefix_reference, parallel, unified):
    engine = LlamaCppEngine(tiny_model, n_ctx=256, parallel=parallel, kv_unified=unified, prefix_min_tokens=16)
    try:
        got = run_all(engine, shared_prefix_requests())
        reused, computed = engine.prefix_tokens_reused, engine.prefix_tokens_computed
    finally:
        engine.close()
    assert outputs(got) == outputs(prefix_reference)
    head = len(SYSTEM.split())
    assert computed > 0 and reused > 10 * head  # most rows started from a copied prefix
    assert sum(c.cached_tokens for c in got.values()) == reused
    assert all(c.cached_tokens < c.prompt_tokens for c in got.values())


def test_no_prefix_reuse_below_the_minimum(tiny_model):
    engine = LlamaCppEngine(tiny_model, n_ctx=256, parallel=4, prefix_min_tokens=10_000)
    try:
        got = run_all(engine, shared_prefix_requests())
    finally:
        engine.close()
    assert engine.prefix_tokens_reused == 0 and all(c.cached_tokens == 0 for c in got.values())


def test_a_prompt_equal_to_the_prefix_still_gets_its_own_logits(tiny_model, single):
    prompt = SYSTEM * 2
    (alone,) = run_all(single, [Request(0, prompt, Sampling(max_tokens=8))]).values()
    engine = LlamaCppEngine(tiny_model, n_ctx=256, parallel=2, prefix_min_tokens=8)
    try:
        got = run_all(engine, [Request(i, prompt + (" the data" if i % 2 else ""), Sampling(max_tokens=8))
                               for i in range(6)])
    finally:
        engine.close()
    assert got[0].text == got[2].text == alone.text
    assert got[2].cached_tokens == got[2].prompt_tokens - 1


def test_chat_messages_render_with_the_models_template(tiny_model, single):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is the price good?"}]
    text = single.chat.render(messages)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nIs the price good?</s>\n<|assistant|>\n"
    (chat,) = run_all(single, [Request(0, None, Sampling(max_tokens=6), messages=messages)]).values()
    tokens = single.tokenize(text, add_special=False, parse_special=True)
    assert chat.error is None and chat.prompt_tokens == len(tokens)
    assert tokens.count(single.ll.llama_vocab_eos(single.vocab)) == 2  # </s> became the EOS token, not text
    assert tokens.count(single.ll.llama_vocab_bos(single.vocab)) == 1  # the template's BOS, and no second


def test_chat_template_from_the_spec_and_template_errors(tiny_model):
    template = ("{% for m in messages %}{% if m.role == 'bot' %}{{ raise_exception('no bots') }}{% endif %}"
                "[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]")
    engine = LlamaCppEngine(tiny_model, n_ctx=256, parallel=2, chat_template=template)
    try:
        assert engine.chat.render([{"role": "user", "content": "hi"}]) == "[user] hi\n[assistant]"
        got = run_all(engine, [Request(0, None, Sampling(max_tokens=4), messages=[{"role": "user", "content": "hi"}]),
                               Request(1, None, Sampling(max_tokens=4), messages=[{"role": "bot", "content": "x"}])])
    finally:
        engine.close()
    assert got[0].error is None and got[0].completion_tokens > 0
    assert got[1].error == "chat_template_error: no bots" and got[1].text is None


def test_sampling_overrides_are_per_request(single):
    base = Sampling(max_tokens=12, temperature=1.0, seed=3)
    reqs = [Request(0, PROMPTS[0], base), Request(1, PROMPTS[0], base.model_copy(update={"max_tokens": 3})),
            Request(2, PROMPTS[0], base.model_copy(update={"temperature": 0.0})),
            Request(3, PROMPTS[0], base.model_copy(update={"top_k": 1}))]
    got = run_all(single, reqs)
    assert got[1].completion_tokens <= 3 and got[0].text.startswith(got[1].text)
    assert got[2].text == got[3].text  # top_k=1 is greedy whatever the temperature
