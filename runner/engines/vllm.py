"""The vLLM engine: vLLM's own continuous batching (LLMEngine add_request / step) behind the engine protocol.

Written against vLLM 0.24.0's V1 `LLMEngine`. Requests are keyed by our own ids (vLLM answers with the
external id we gave), outputs are FINAL_ONLY so a step returns only finished rows, and every check vLLM
makes while adding a request (prompt too long for max_model_len, empty prompt, bad sampling values)
raises there, synchronously, which makes it a row error here rather than a crash.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from runner.engines.base import Completion, Request
from runner.errors import EngineError, first_line
from runner.spec import JobSpec, Sampling, WorkerPool

log = logging.getLogger(__name__)

# The engine keeps this many times max_num_seqs requests queued in vLLM, so the scheduler refills a
# finished sequence's slot in the same step, across unit boundaries, without waiting for us.
IN_FLIGHT_PER_SEQ = 2
OK_FINISH = {"stop", "length", "repetition"}


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise EngineError(f"engine vllm: cannot import vllm ({e}); install it on the GPU nodes with "
                          "`pip install 'runner[vllm]'`") from None


class VLLMEngine:
    """One vLLM LLMEngine; `capacity` is IN_FLIGHT_PER_SEQ x its resolved max_num_seqs."""

    def __init__(self, engine: Any, chat_template: str | None = None):
        from vllm.sampling_params import RequestOutputKind

        self.engine = engine
        self.final_only = RequestOutputKind.FINAL_ONLY
        self.max_num_seqs = int(engine.vllm_config.scheduler_config.max_num_seqs)
        self.max_model_len = int(engine.model_config.max_model_len)
        self.capacity = IN_FLIGHT_PER_SEQ * self.max_num_seqs
        self.chat_template = chat_template
        self.tokenizer = None  # loaded on the first chat row
        self.failed: list[Completion] = []  # rows vLLM refused in add, returned by the next step
        self.params: dict[int, tuple[Sampling, Any]] = {}  # id(Sampling) -> (that Sampling, its SamplingParams)

    @classmethod
    def from_pool(cls, pool: WorkerPool, spec: JobSpec) -> "VLLMEngine":
        """Build vLLM's engine from the pool's engine_args, unchanged apart from two defaults: no periodic
        stats lines, and vLLM's Ray executor when a replica spans several GPUs (its placement group's)."""
        vllm = import_vllm()
        from vllm.usage.usage_lib import UsageContext

        args = {"model": pool.model, "disable_log_stats": True, **pool.engine_args}
        if pool.gpus_per_replica > 1:
            args.setdefault("distributed_executor_backend", "ray")
        where = f"engine_args of the vllm pool for {pool.model}"
        try:
            engine_args = vllm.EngineArgs(**args)
        except TypeError as e:
            raise EngineError(f"{where}: not an argument of vLLM's EngineArgs ({e})") from None
        try:
            # LLM_CLASS: the batch defaults of vllm.LLM (e.g. max_num_seqs 1024 on an H100), not a server's.
            engine = vllm.LLMEngine.from_engine_args(engine_args, usage_context=UsageContext.LLM_CLASS)
        except (ValueError, OSError) as e:
            raise EngineError(f"{where}: vLLM could not start {pool.model} ({first_line(e)})") from None
        self = cls(engine, pool.chat_template)
        log.info("vllm %s: max_num_seqs %d, max_model_len %d, %d requests kept in flight", pool.model,
                 self.max_num_seqs, self.max_model_len, self.capacity)
        return self

    # -- the engine protocol -------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Hand the row to vLLM; one it refuses comes back failed from the next `step`."""
        prompt, extra = request.prompt, {}
        try:
            if request.messages is not None:
                prompt = self._render_chat(request.messages)
                extra = {"tokenization_kwargs": {"add_special_tokens": False}}  # the template wrote BOS
            params = self._sampling_params(request.sampling)
        except _RowError as e:
            self.failed.append(Completion.failed(request.id, str(e)))
            return
        try:
            self.engine.add_request(str(request.id), prompt, params, **extra)
        except ValueError as e:  # vLLM's validation errors, VLLMValidationError among them
            self.failed.append(Completion.failed(request.id, _refusal(str(e))))

    def step(self) -> list[Completion]:
        done, self.failed = self.failed, []
        if self.engine.has_unfinished_requests():
            done.extend(self._completion(out) for out in self.engine.step() if out.finished)
        return done

    def abort(self, request_id: int) -> None:
        self.engine.abort_request([str(request_id)])  # an aborted request yields no output

    def has_unfinished(self) -> bool:
        return bool(self.failed) or self.engine.has_unfinished_requests()

    def close(self) -> None:
        self.engine.engine_core.shutdown()  # LLMEngine has no shutdown() of its own in 0.24

    # -- helpers -------------------------------------------------------------------------------

    def _completion(self, out) -> Completion:
        rid = int(out.request_id)
        result = out.outputs[0]
        prompt_tokens = len(out.prompt_token_ids or ())
        if result.finish_reason not in OK_FINISH:
            return Completion.failed(rid, f"engine_{result.finish_reason}: vLLM ended the request", prompt_tokens)
        return Completion(rid, result.text, result.finish_reason, prompt_tokens, len(result.token_ids),
                          cached_tokens=out.num_cached_tokens or 0)

    def _sampling_params(self, s: Sampling):
        """One SamplingParams per distinct Sampling object (rows without overrides share the job's)."""
        hit = self.params.get(id(s))
        if hit is not None and hit[0] is s:
            return hit[1]
        from vllm import SamplingParams

        try:
            params = SamplingParams(
                n=1, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                min_p=s.min_p, repetition_penalty=s.repeat_penalty, presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty, stop=list(s.stop), output_kind=self.final_only,
                # A seeded row gets a sampler of its own in vLLM; greedy rows need none.
                seed=s.seed if s.temperature > 0 else None)
        except ValueError as e:
            raise _RowError(f"bad_sampling: {first_line(e)}") from None
        if len(self.params) >= 4096:
            self.params.clear()
        self.params[id(s)] = (s, params)  # the Sampling is held, so its id cannot be reused while cached
        return params

    def _render_chat(self, messages: list[dict]) -> str:
        if self.tokenizer is None:
            self.tokenizer = self.engine.get_tokenizer()
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      chat_template=self.chat_template)
        except Exception as e:  # a template is user code: any failure is this row's
            kind = "no_chat_template" if "chat_template" in str(e) and "not set" in str(e) else "chat_template_error"
            raise _RowError(f"{kind}: {first_line(e)}") from None


class _RowError(Exception):
    pass


def _refusal(message: str) -> str:
    """vLLM's reason for refusing a request, as `kind: message`."""
    text = first_line(message)
    if "maximum context length" in text or "maximum model length" in text:
        return f"prompt_too_long: {text}"
    if "cannot be empty" in text:
        return f"empty_prompt: {text}"
    return f"invalid_request: {text}"
