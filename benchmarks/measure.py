"""What every benchmark here prints: one measured run, a row of its table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    name: str
    prompts: int
    completion_tokens: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        """Generated tokens per second."""
        return self.completion_tokens / self.seconds if self.seconds else 0.0
