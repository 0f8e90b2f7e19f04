"""The sequences of a llama.cpp context: a row's choices, a queued request, a shared prefix, a slot in use."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from runner.engines.base import Choice, Request, TokenLogprob
from runner.engines.llamacpp.grammar import GrammarTextDecoder


@dataclass
class Group:
    """The n choices of one row. The first choice's prompt KV is copied to the others when its prefill ends;
    the row completes once, when every choice has finished."""

    n: int
    queued: int = 1  # choices handed a slot or a place in the queue
    choices: list[Choice | None] = field(default_factory=list)
    first: Seq | None = None  # the first choice, once finished: its logprobs and cached tokens are the row's

    def __post_init__(self):
        self.choices = [None] * self.n


@dataclass
class Pending:
    """A request (or one of its choices) waiting for a slot, tokenized on arrival."""

    request: Request
    tokens: list[int]
    choice: int = 0
    group: Group | None = None


@dataclass
class Prefix:
    """A token prefix shared by queued prompts, computed once in its own sequence and copied to each user."""

    tokens: list[int]
    fed: int = 0

    @property
    def ready(self) -> bool:
        return self.fed == len(self.tokens)


@dataclass
class Seq:
    """A request occupying one sequence slot of the context."""

    request: Request
    slot: int
    prompt: list[int]
    sampler: object
    choice: int = 0
    group: Group | None = None
    fed: int = 0  # tokens already in the KV cache
    reused: int = 0  # of them, copied from the shared prefix
    next_token: int | None = None  # sampled, not yet fed
    generated: int = 0
    text: str = ""
    decoder: codecs.IncrementalDecoder | GrammarTextDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    logprobs: list[TokenLogprob] | None = None  # kept only when the row asks for them

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (binary search over C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


