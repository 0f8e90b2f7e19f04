"""A model-free engine that returns each prompt's words: for dry runs of a pipeline and scheduler tests."""

from __future__ import annotations

import ctypes
import os
import time
import zlib
from collections import deque

import numpy as np

from runner.engines.base import Completion, Request
from runner.spec.job import JobSpec
from runner.spec.pools import EchoPool


class EchoEngine:
    """Generates the prompt's own words (a chat row's last message), one word a token, `capacity` rows a step.

    engine_args: `step_s` sleeps that long each step (to model a slow engine); `crash_on` crashes the whole
    process with a real SIGSEGV, as a native engine's crash does, when a prompt contains that text (a poison
    row; "" crashes on every row, the warm-up's too: a model that cannot decode); `hang_on` makes the
    step never return, as a deadlocked native engine would; `load_s` and `fail_loads` model a slow load and
    a failing one. For task embed a row's vector counts its words' hashes in `dim` buckets: the same text
    always gives the same vector.
    """

    def __init__(self, capacity: int = 8, step_s: float = 0.0, crash_on: str | None = None,
                 hang_on: str | None = None, embedding_dim: int = 0, normalize: bool = True):
        self.capacity = capacity
        self.embedding_dim, self.normalize = embedding_dim, normalize
        self.step_s = step_s
        self.crash_on = crash_on
        self.hang_on = hang_on
        self.queue: deque[Request] = deque()

    @classmethod
    def from_pool(cls, pool: EchoPool, spec: JobSpec) -> EchoEngine:
        args = pool.engine_args
        time.sleep(args.load_s)
        if args.fail_loads:
            fail_load(args.fail_loads, args.fail_loads_dir)
        return cls(capacity=pool.parallel, step_s=args.step_s, crash_on=args.crash_on, hang_on=args.hang_on,
                   embedding_dim=args.dim if spec.task == "embed" else 0, normalize=spec.embedding.normalize)

    def add(self, request: Request) -> None:
        self.queue.append(request)

    def abort(self, request_id: int) -> None:
        self.queue = deque(r for r in self.queue if r.id != request_id)

    def has_unfinished(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[Completion]:
        if self.step_s:
            time.sleep(self.step_s)
        done = []
        for _ in range(min(self.capacity, len(self.queue))):
            r = self.queue.popleft()
            if self.crash_on is not None and r.prompt and self.crash_on in r.prompt:
                ctypes.string_at(0)  # a real SIGSEGV, as a native engine's crash is
            while self.hang_on and r.prompt and self.hang_on in r.prompt:
                time.sleep(3600)
            words = echo_words(r.prompt if r.messages is None else r.messages)
            if self.embedding_dim:
                done.append(Completion(r.id, None, None, len(words), embedding=self._embed(words)))
                continue
            out = words[: r.sampling.max_tokens]
            reason = "length" if len(words) > r.sampling.max_tokens else "stop"
            done.append(Completion(r.id, " ".join(out), reason, len(words), len(out)))
        return done

    def _embed(self, words: list[str]) -> np.ndarray:
        vector = np.zeros(self.embedding_dim, np.float32)
        for w in words:
            vector[zlib.crc32(w.encode()) % self.embedding_dim] += 1.0
        norm = float(np.linalg.norm(vector))
        return vector / norm if self.normalize and norm else vector

    def close(self) -> None:
        self.queue.clear()


def fail_load(count: int, where: str) -> None:
    """Raise while fewer than `count` loads have failed: each failure is a file in `where` that only one
    process can create."""
    os.makedirs(where, exist_ok=True)
    for k in range(count):
        try:
            os.close(os.open(os.path.join(where, f"load-{k}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        raise RuntimeError(f"echo: load {k + 1} of the first {count} fails (engine_args.fail_loads)")


def echo_words(prompt: str | list[dict]) -> list[str]:
    """The echo engine's tokens of a row: its prompt's words, a chat row's last message's."""
    return (prompt[-1]["content"] if isinstance(prompt, list) else prompt).split()
