"""Stand-in for vllm.outputs (vLLM 0.24.0)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:
    def __init__(self, request_id, prompt, prompt_token_ids, outputs, finished, num_cached_tokens=None):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.outputs, self.finished, self.num_cached_tokens = outputs, finished, num_cached_tokens
