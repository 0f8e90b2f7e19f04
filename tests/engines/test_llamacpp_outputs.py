"""llama.cpp's structured outputs, logprobs, n choices and embeddings, on the generated tiny (random-weight) GGUF."""

import json
import re

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from conftest import run_all  # noqa: E402

from runner.engines.base import Request  # noqa: E402
from runner.engines.constraints import check  # noqa: E402
from runner.engines.llamacpp.embed import LlamaCppEmbedder  # noqa: E402
from runner.engines.llamacpp.generate import LlamaCppEngine  # noqa: E402
from runner.engines.llamacpp.grammar import GrammarTextDecoder, gbnf  # noqa: E402
from runner.spec.job import parse_spec
from runner.spec.sampling import Sampling  # noqa: E402
from runner.tinymodel import _WORDS  # noqa: E402

PROMPTS = [" ".join(_WORDS[i: i + 1 + i % 17]) for i in range(0, 160, 4)]  # 40 prompts of 1..17 words

PERSON = {"type": "object", "required": ["name", "age", "ok"], "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}, "ok": {"type": "boolean"}}}
TAGS = {"type": "object", "required": ["tags"], "properties": {
    "tags": {"type": "array", "items": {"enum": ["a", 'b"c', "é"]}, "maxItems": 3}, "score": {"type": "number"}}}
CODE = {"type": "object", "required": ["s", "d"], "properties": {
    "s": {"type": "string", "minLength": 2, "maxLength": 5}, "d": {"type": "string", "pattern": r"^[0-9]{2}\.[a-z]$"}}}
ITEMS = {"type": "array", "maxItems": 2, "items": {"type": "object", "required": ["x"],
                                                   "properties": {"x": {"type": "integer"}}}}
CHOICES = ["yes", "no", 'a "quoted" one', "back\\slash", "ünï"]
REGEXES = [r"\d{2,3}-[a-z]{1,4}\.", r"(?:ab|c\+)+?x{0,2}", r"[^a-z]{2}\s\w"]


def schema(s: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": s}}


CONSTRAINTS = ([{"response_format": schema(s)} for s in (PERSON, TAGS, CODE, ITEMS)]
               + [{"response_format": {"type": "json_object"}}, {"choice": CHOICES}]
               + [{"regex": r} for r in REGEXES])


def constrained_requests() -> list[Request]:
    """Every constraint, greedy and sampled, over different prompts: rows of different schemas in one batch."""
    out = []
    for i, prompt in enumerate(PROMPTS * 2):
        over = CONSTRAINTS[i % len(CONSTRAINTS)]
        temp = 0.0 if i % 2 == 0 else 0.9
        out.append(Request(i, prompt, Sampling(max_tokens=128, temperature=temp, seed=i, **over)))
    return out


@pytest.fixture(scope="module")
def wide(tiny_model):
    engine = LlamaCppEngine(tiny_model, n_ctx=256, parallel=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def constrained(single, wide):
    """The constrained rows decoded at parallel 1 and at parallel 16."""
    return {1: run_all(single, constrained_requests()), 16: run_all(wide, constrained_requests())}


@pytest.mark.parametrize("parallel", [1, 16])
def test_constrained_rows_follow_their_constraint(constrained, parallel):
    got = constrained[parallel]
    stopped = set()
    for r in constrained_requests():
        c, s = got[r.id], r.sampling
        assert c.error is None, c.error
        if c.finish_reason != "stop":
            continue
        stopped.add(r.id % len(CONSTRAINTS))
        checked = check(c, s)
        assert checked.error is None, (c.text, checked.error)
        if s.json_schema is not None:
            assert checked.parsed == json.loads(c.text)
        if s.choice is not None:
            assert c.text in CHOICES
        if s.regex is not None:
            assert re.fullmatch(s.regex, c.text)
    assert stopped == set(range(len(CONSTRAINTS)))  # every kind of constraint had rows that finished


def test_batched_greedy_structured_rows_equal_rows_alone(constrained):
    greedy = [r.id for r in constrained_requests() if r.sampling.temperature == 0]
    alone, batched = constrained[1], constrained[16]
    assert [(alone[i].text, alone[i].finish_reason) for i in greedy] == \
           [(batched[i].text, batched[i].finish_reason) for i in greedy]


def test_each_distinct_constraint_is_parsed_once(wide, constrained):
    assert len(wide.grammars.cache) == len(CONSTRAINTS)


def test_bad_grammars_are_row_errors(wide):
    rows = [Request(0, "the", Sampling(grammar="root ::= undefined-rule")),
            Request(1, "the", Sampling(grammar='root ::= root "a"')),  # left recursion
            Request(2, "the", Sampling(regex=r"\bword")),
            Request(3, "the", Sampling(max_tokens=8, choice=["ok"]))]
    got = run_all(wide, rows)
    for i in (0, 1, 2):
        assert got[i].error.startswith("bad_grammar: ") and got[i].text is None
    assert got[3].error is None and got[3].text == "ok" and got[3].finish_reason == "stop"


def test_choices_are_escaped_literals():
    assert gbnf(Sampling(choice=['say "hi"', "a\\b", "x\ny"])) == r'root ::= "say \"hi\"" | "a\\b" | "x\ny"'


def test_text_of_constrained_rows_decodes_bytes_as_the_grammar_does():
    decoder = GrammarTextDecoder()
    text = "".join(decoder.decode(bytes([b])) for b in "é€".encode() + b"\xe0\x84\xb8" + b"\xc3")
    assert text + decoder.decode(b"", final=True) == "é€\u0138\ufffd"  # an overlong sequence is one character


def test_logprobs_greedy(wide):
    got = run_all(wide, [Request(0, PROMPTS[3], Sampling(max_tokens=12, logprobs=4)),
                         Request(1, PROMPTS[3], Sampling(max_tokens=12))])
    c = got[0]
    assert got[1].logprobs is None and c.text == got[1].text
    assert len(c.logprobs) == c.completion_tokens > 0
    assert "".join(t.token for t in c.logprobs) == c.text
    for t in c.logprobs:
        assert len(t.top) == 4 and t.logprob <= 0
        assert [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)
        assert t.logprob == t.top[0][1] and t.token == t.top[0][0]  # greedy picks the most likely token


def test_n_choices_are_seeded(single, wide):
    rows = [Request(0, PROMPTS[5], Sampling(max_tokens=10, temperature=0.9, seed=5, n=3)),
            Request(1, PROMPTS[6], Sampling(max_tokens=10, temperature=0.9, seed=5, n=20))]  # more than parallel
    first, again, alone = run_all(wide, rows), run_all(wide, rows), run_all(single, rows)

    def choices(got, i):
        return [(ch.text, ch.finish_reason, ch.completion_tokens) for ch in got[i].choices]

    assert len(first[0].choices) == 3 and len(first[1].choices) == 20
    assert len({ch.text for ch in first[0].choices}) > 1
    assert (first[0].text, first[0].completion_tokens) == (first[0].choices[0].text,
                                                           first[0].choices[0].completion_tokens)
    for i in (0, 1):
        assert choices(first, i) == choices(again, i) == choices(alone, i)


@pytest.fixture(scope="module")
def embedder(tiny_model):
    engine = LlamaCppEmbedder(tiny_model, n_ctx=64, parallel=8, n_batch=256)
    yield engine
    engine.close()


def test_embeddings_alone_equal_batched_and_are_normalized(embedder):
    batched = run_all(embedder, [Request(i, p) for i, p in enumerate(PROMPTS)])
    assert embedder.embedding_dim == 128
    for i in (0, 7, 20):
        (alone,) = run_all(embedder, [Request(100 + i, PROMPTS[i])]).values()
        assert np.allclose(alone.embedding, batched[i].embedding, atol=1e-5)
    for c in batched.values():
        assert c.error is None and c.text is None and c.prompt_tokens > 0
        assert len(c.embedding) == 128 and abs(np.linalg.norm(c.embedding) - 1) < 1e-5
    assert not np.allclose(batched[0].embedding, batched[1].embedding)


def test_embeddings_unnormalized_and_too_long(tiny_model, embedder):
    raw = LlamaCppEmbedder(tiny_model, n_ctx=64, parallel=4, normalize=False)
    try:
        got = run_all(raw, [Request(0, PROMPTS[9]), Request(1, "word " * 100)])
    finally:
        raw.close()
    (unit,) = run_all(embedder, [Request(2, PROMPTS[9])]).values()
    norm = np.linalg.norm(got[0].embedding)
    assert abs(norm - 1) > 1e-3 and np.allclose(got[0].embedding / norm, unit.embedding, atol=1e-5)
    assert got[1].error.startswith("prompt_too_long") and got[1].embedding is None


def test_cls_pooling_of_a_causal_model_sees_only_the_first_token(tiny_model):
    cls = LlamaCppEmbedder(tiny_model, n_ctx=64, parallel=4, pooling="cls")
    try:
        got = run_all(cls, [Request(i, p) for i, p in enumerate(PROMPTS[:4])])
    finally:
        cls.close()
    assert all(np.allclose(got[0].embedding, c.embedding, atol=1e-5) for c in got.values())


def test_from_pool_builds_the_engine_the_task_needs(tiny_model, tmp_path):
    def spec(**top):
        raw = {"name": "t", "input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
               "workers": [{"engine": "llamacpp", "model": tiny_model, "n_ctx": 64, "parallel": 2}], **top}
        return parse_spec(raw, {})[0]

    embed = spec(task="embed", embedding={"normalize": False})
    engine = LlamaCppEngine.from_pool(embed.workers[0], embed)
    try:
        assert isinstance(engine, LlamaCppEmbedder) and engine.embedding_dim == 128 and not engine.normalize
    finally:
        engine.close()
    generate = spec()
    engine = LlamaCppEngine.from_pool(generate.workers[0], generate)
    try:
        assert isinstance(engine, LlamaCppEngine) and engine.embedding_dim == 0
    finally:
        engine.close()
