"""One pool's replicas as the supervisor keeps them, and the backoff between a replica's failed starts."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKOFF_S = (1.0, 30.0)  # a failed start is tried again after 1 s, doubling, at most 30 s


def backoff(failed_starts: int) -> float:
    """Seconds before a replica that failed `failed_starts` starts is started again."""
    return min(BACKOFF_S[0] * 2 ** (failed_starts - 1), BACKOFF_S[1])


@dataclass
class Replicas:
    """One pool's replicas: those running (or waiting for a node), those to start again, and those given up."""

    target: int = 0
    live: set[int] = field(default_factory=set)
    waiting: dict[int, float] = field(default_factory=dict)  # replica -> when it starts again
    failed_starts: dict[int, int] = field(default_factory=dict)  # replica -> its failed starts
    given_up: set[int] = field(default_factory=set)

    def active(self) -> int:
        return len(self.live) + len(self.waiting)

    def next_index(self) -> int:
        taken = self.live | set(self.waiting) | self.given_up
        return next(i for i in range(len(taken) + 1) if i not in taken)
