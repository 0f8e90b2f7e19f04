"""The one engine protocol that llama.cpp, vLLM and the echo engine implement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from runner.spec.sampling import Sampling


@dataclass(frozen=True, slots=True)
class Request:
    """One row to generate from: a prompt, or chat `messages` ([{role, content}, ...]) that the engine
    renders with the model's chat template. `id` is unique within one engine's lifetime."""

    id: int
    prompt: str | None
    sampling: Sampling = field(default_factory=Sampling)
    messages: list[dict] | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability, with the `top` most likely alternatives (token, logprob) at its step."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Choice:
    """One of a row's `n` completions."""

    text: str
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Completion:
    """The result of one request: text on success, error (and no text) when the row failed.

    Engines fill `logprobs` when the row's sampling asks for them, `choices` (every completion, the first
    being `text`) when n > 1, and `embedding` instead of text for task embed. `parsed` is set after
    decoding, by runner.spec.schema, for a row whose text follows its JSON schema.
    """

    request_id: int
    text: str | None
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens taken from a shared prefix instead of computed
    logprobs: list[TokenLogprob] | None = None
    choices: list[Choice] | None = None
    embedding: Sequence[float] | None = None
    parsed: Any = None

    @classmethod
    def failed(cls, request_id: int, error: str, prompt_tokens: int = 0) -> Completion:
        return cls(request_id, None, None, prompt_tokens, 0, error)


class Refused:
    """Rows an engine refused in `add` (a bad row is that row's error, never the engine's), handed back by its
    next `step`."""

    def __init__(self):
        self.rows: list[Completion] = []

    def add(self, request_id: int, error: str, prompt_tokens: int = 0) -> None:
        self.rows.append(Completion.failed(request_id, error, prompt_tokens))

    def too_long(self, request_id: int, tokens: int, n_ctx: int) -> None:
        self.add(request_id, f"prompt_too_long: {tokens} tokens, the context holds {n_ctx}", tokens)

    def drop(self, request_id: int) -> None:
        self.rows = [c for c in self.rows if c.request_id != request_id]

    def take(self) -> list[Completion]:
        rows, self.rows = self.rows, []
        return rows

    def __bool__(self) -> bool:
        return bool(self.rows)


@runtime_checkable
class Engine(Protocol):
    """Continuous batching behind four calls.

    `add` queues a request (never raises for a bad row: the row's Completion carries the
    error), `step` advances every running sequence by one decode and returns the requests
    that finished, `abort` drops a request, `has_unfinished` says whether `step` has work.
    `capacity` is how many sequences the engine decodes at once; the caller keeps that
    many (and a few more) in flight. An engine built for task embed answers each request with
    an embedding; `embedding_dim` is its width (0 for a generating engine).
    """

    capacity: int
    embedding_dim: int

    def add(self, request: Request) -> None: ...

    def step(self) -> list[Completion]: ...

    def abort(self, request_id: int) -> None: ...

    def has_unfinished(self) -> bool: ...

    def close(self) -> None: ...
