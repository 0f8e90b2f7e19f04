"""Stand-in for vllm.sampling_params (vLLM 0.24.0): keyword fields, validated like vLLM's _verify_args."""

from __future__ import annotations

from enum import IntEnum


class RequestOutputKind(IntEnum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class SamplingParams:
    def __init__(self, n=1, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, temperature=1.0,
                 top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=None, stop_token_ids=None, ignore_eos=False,
                 max_tokens=16, min_tokens=0, logprobs=None, detokenize=True, skip_special_tokens=True,
                 output_kind=RequestOutputKind.CUMULATIVE, structured_outputs=None):
        from vllm import VLLMValidationError

        if temperature > 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {temperature}.")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        if top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
        if not -2.0 <= presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {presence_penalty}.")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        self.__dict__.update(n=n, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             repetition_penalty=repetition_penalty, temperature=temperature, top_p=top_p,
                             top_k=top_k, min_p=min_p, seed=seed, stop=list(stop or []), max_tokens=max_tokens,
                             output_kind=output_kind)
