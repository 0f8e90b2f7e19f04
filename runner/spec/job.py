"""The job spec: job.yaml parsed, ${VAR}-resolved and validated once into one typed object."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from runner.errors import SpecError, key_path
from runner.spec.pools import POOLS, EchoPool, LlamaCppPool, VLLMPool
from runner.spec.sampling import GENERATE_ONLY_KEYS, Sampling, _Model
from runner.storage.location import PathOrUrl

SECRET_KEYS = re.compile(r"(secret|token|password|passwd|key|credential|session)", re.I)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# The input keys that name the columns (a Parquet column, a JSON object's key) a row comes from.
COLUMN_KEYS = ("prompt_column", "messages_column", "sampling_column", "id_column", "columns")


class FormatKeys(NamedTuple):
    """What an input format takes of COLUMN_KEYS, and why it refuses the others."""

    takes: tuple[str, ...]
    why_not: str = ""


# Every input format by name (runner.inputs.formats registers each one's planner and reader under it).
FORMAT_KEYS = {
    "parquet": FormatKeys(COLUMN_KEYS),
    "jsonl": FormatKeys(COLUMN_KEYS),
    "openai_batch": FormatKeys((), "an openai_batch line's body holds its row and sampling, and its custom_id is "
                                   "copied to the output"),
}


class InputSpec(_Model):
    path: PathOrUrl = Field(description="A Parquet file, a directory (every `*.parquet` below it, in sorted "
                                        "order) or a glob; any fsspec URL. With `format: jsonl` or "
                                        "`openai_batch`: `*.jsonl` files instead.")
    format: Literal["parquet", "jsonl", "openai_batch"] = Field(
        "parquet", description="`parquet`; `jsonl`: one JSON object per line, whose keys are the columns the "
                               "column keys name; or `openai_batch`: JSONL request files as the OpenAI Batch API "
                               "takes them (each line `{custom_id, method, url, body}`); a line's body is its row "
                               "and its sampling, `custom_id` is copied to the output, and the column keys do not "
                               "apply.")
    prompt_column: str | None = Field(
        "prompt", description="String (or binary UTF-8) column holding the prompt; give it or `messages_column`.")
    messages_column: str | None = Field(
        None, description="Chat rows instead of prompts: a `list<struct<role: string, content: string>>` column "
                          "(or its JSON text), rendered with the model's chat template.")
    sampling_column: str | None = Field(
        None, description="Per-row sampling overrides laid over `sampling`: a struct column (null fields are "
                          "unset) or a JSON object string, e.g. `{\"temperature\": 0.7, \"max_tokens\": 16}`; a "
                          "bad override fails that row (`bad_sampling`).")
    id_column: str | None = Field(None, description="Column copied to the output, to join results back.")
    columns: list[str] = Field(default_factory=list, description="More columns copied to the output.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for `input.path`.")

    @model_validator(mode="before")
    @classmethod
    def _messages_replace_prompt(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("messages_column") and "prompt_column" not in data:
            data = {**data, "prompt_column": None}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        takes, why_not = FORMAT_KEYS[self.format]
        given = [k for k in COLUMN_KEYS if k not in takes and _given(self, k)]
        if given:
            takers = " and ".join(name for name, keys in FORMAT_KEYS.items() if given[0] in keys.takes)
            raise ValueError(f"{given[0]} is a {takers} setting; {why_not}")
        if "prompt_column" not in takes:
            return self
        if self.messages_column and self.prompt_column:
            raise ValueError("give prompt_column or messages_column, not both")
        if not (self.messages_column or self.prompt_column):
            raise ValueError("give prompt_column or messages_column")
        return self

    @property
    def row_column(self) -> str:
        """The column each row's prompt (or chat) comes from."""
        return self.messages_column or self.prompt_column  # type: ignore[return-value]


class EmbeddingSpec(_Model):
    """How `task: embed` writes vectors."""

    normalize: bool = Field(True, description="Scale each vector to length 1 (as llama-server and vLLM do by default).")


class OutputSpec(_Model):
    path: PathOrUrl = Field(description="Directory (any fsspec URL) that receives Parquet parts and bookkeeping files.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for `output.path`.")
    target_file_mb: float = Field(
        256, ge=0, description="Size of the output files, in MB: committed units wait under `_parts/` (which "
                               "readers skip) until their rows make a file of about this size, written whole; the "
                               "last, smaller file when the job ends. 0: one file a unit, visible at its commit.")


WorkerPool = Annotated[LlamaCppPool | VLLMPool | EchoPool, Field(discriminator="engine")]


class JobSpec(_Model):
    """One job: where prompts come from, who generates, where outputs go."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Job name (letters, digits, _ . -).")
    task: Literal["generate", "embed"] = Field(
        "generate", description="`generate` text, or `embed` each prompt into one vector (the `embedding` column; "
                                "sampling keys that shape text, such as `response_format` or `n`, are refused).")
    input: InputSpec = Field(description="Where the rows come from, and which columns they use.")
    output: OutputSpec = Field(description="Where the outputs go.")
    sampling: Sampling = Field(default_factory=Sampling, description="How tokens are drawn: every row's default, "
                                                                     "under its own `sampling_column` overrides.")
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec, description="`task: embed` only.")
    workers: list[WorkerPool] = Field(
        min_length=1, description="The worker pools: each entry one pool of identical Ray actors, its keys by "
                                  "`engine`. Every pool pulls units from the same queue, so a faster pool takes "
                                  "more.")
    unit_rows: int = Field(256, ge=1, description="Rows per unit of work: the checkpoint granularity.")
    max_attempts: int = Field(3, ge=1, description="Tries per unit before its rows are written as failed.")
    max_failed_rows: int | float | None = Field(
        None, description="Fail the job when more rows than this (a count, or a fraction < 1) failed; null: never."
    )
    prefetch_units: int = Field(1, ge=0, description="Units a worker reads ahead while it decodes.")

    @model_validator(mode="after")
    def _pools(self) -> JobSpec:
        for i, pool in enumerate(self.workers):
            if pool.unit_rows is not None and pool.unit_rows % self.unit_rows:
                raise ValueError(f"workers[{i}].unit_rows: expected a multiple of the job's unit_rows "
                                 f"({self.unit_rows}), got {pool.unit_rows}")
        names = self.pool_names()
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"workers[{i}].name: pool name {name!r} is already used by "
                                 f"workers[{names.index(name)}]; each pool needs its own")
        return self

    @model_validator(mode="after")
    def _task(self) -> JobSpec:
        if self.task == "embed":
            if self.input.messages_column:
                raise ValueError("input.messages_column: task embed takes prompts (prompt_column), not chat rows")
            asked = [k for k in GENERATE_ONLY_KEYS if _given(self.sampling, k)]
            if asked:
                raise ValueError(f"sampling.{asked[0]}: a generate setting; task embed generates no text")
        elif _given(self, "embedding"):
            raise ValueError("embedding: a task embed setting; this job's task is generate")
        return self

    @model_validator(mode="after")
    def _apart(self) -> JobSpec:
        """Outputs inside the input could be read as input; an input inside the output would be deleted by
        --overwrite. Compared as URLs, without touching storage."""
        if self.input.storage_options.get("endpoint_url") != self.output.storage_options.get("endpoint_url"):
            return self  # two object stores: nothing can overlap
        inp, out = _location(self.input.path), _location(self.output.path)
        if inp == out:
            raise ValueError(f"input.path {self.input.path} and output.path {self.output.path} are the same "
                             "location; give the outputs a place of their own")
        if _inside(out, inp):
            raise ValueError(f"output.path {self.output.path} is inside input.path {self.input.path}: the job could "
                             "read its own outputs as input; give the outputs a place of their own")
        if _inside(inp, out):
            raise ValueError(f"input.path {self.input.path} is inside output.path {self.output.path}: --overwrite "
                             "would delete it; give the outputs a place of their own")
        return self

    def units_per_lease(self, pool_index: int) -> int:
        """How many checkpoint units a replica of the pool takes from the queue at once."""
        return (self.workers[pool_index].unit_rows or self.unit_rows) // self.unit_rows

    @field_validator("max_failed_rows")
    @classmethod
    def _fraction_or_count(cls, v):
        if v is not None and (v < 0 or (isinstance(v, float) and v >= 1 and not v.is_integer())):
            raise ValueError("expected a count >= 0 or a fraction below 1")
        return v

    def pool_names(self) -> list[str]:
        return [p.name or f"{p.engine}{i}" for i, p in enumerate(self.workers)]

    def fingerprint(self) -> str:
        """Hash of everything that changes what the outputs hold; resume refuses when it differs. A key that
        holds its default, written out or not, hashes as if it were not written (the pools' output_settings
        do the same for theirs), so the same job always has the same fingerprint."""
        body = {
            # format left at parquet is left out: jobs planned before it existed keep their fingerprint
            "input": self.input.model_dump(exclude={"storage_options"} | (set() if _given(self.input, "format")
                                                                          else {"format"})),
            "sampling": _fingerprinted(self.sampling),
            "models": sorted({p.output_settings() for p in self.workers}, key=str),
            "unit_rows": self.unit_rows,
        }
        if self.task == "embed":
            body["embed"] = self.embedding.model_dump()
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _given(model: BaseModel, key: str) -> bool:
    """Whether `key` holds something other than its default. Checks ask this, not whether the key was
    written, so the resolved spec (defaults filled in, as _job.json records it) validates again."""
    return getattr(model, key) != type(model).model_fields[key].get_default(call_default_factory=True)


def _fingerprinted(sampling: Sampling) -> dict:
    """The sampling keys a fingerprint hashes: the keys added after the first jobs were planned only when they
    change something, so those jobs keep their fingerprint and `n: 1` hashes as no n. A response_format of type
    text constrains nothing (and adds no column): it hashes as none."""
    left_out = {k for k in GENERATE_ONLY_KEYS if not _given(sampling, k)}  # the keys added after the first jobs
    if sampling.response_format is not None and sampling.response_format.type == "text":
        left_out.add("response_format")
    return sampling.model_dump(exclude=left_out)


_PROTOCOL_ALIASES = {None: "file", "local": "file", "s3a": "s3", "gcs": "gs"}


def _location(url: str) -> tuple[str, str]:
    """(protocol, normalized path) of a location; a glob stands for the directory before its first wildcard."""
    from fsspec.core import split_protocol

    protocol, path = split_protocol(url)
    wildcard = min((i for i in map(path.find, "*?[") if i >= 0), default=-1)
    if wildcard >= 0:
        path = path[:wildcard].rpartition("/")[0] or "/"
    return _PROTOCOL_ALIASES.get(protocol, protocol), posixpath.normpath(path).rstrip("/")


def _inside(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether location `a` lies below location `b` (on a `/` boundary: in2/ is not inside in/)."""
    return a[0] == b[0] and a[1].startswith(b[1] + "/")


def load_spec(path: str | os.PathLike, env: dict[str, str] | None = None) -> tuple[JobSpec, dict]:
    """Parse and validate a job.yaml; returns the spec and its redacted form (safe to log or save)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read job spec ({e.strerror or e})") from None
    return parse_spec_text(text, str(path), env)


def parse_spec_text(text: str, source: str, env: dict[str, str] | None = None) -> tuple[JobSpec, dict]:
    """Like load_spec, from the YAML text itself; `source` names it in errors."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{source}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping of keys at the top level")
    return parse_spec(raw, env if env is not None else dict(os.environ), source=source)


def parse_spec(raw: dict, env: dict[str, str], source: str = "job.yaml") -> tuple[JobSpec, dict]:
    secret_paths: set[tuple] = set()
    resolved = _interpolate(raw, env, (), secret_paths)
    try:
        spec = JobSpec.model_validate(resolved)
    except ValidationError as e:
        raise SpecError(f"{source}: {describe_error(e, secret_paths)}") from None
    return spec, redact(spec.model_dump(mode="json"), raw, secret_paths)


def redact(resolved: Any, raw: Any, secret_paths: set, path: tuple = (), key: str = "") -> Any:
    """The resolved spec (defaults filled in) that is safe to log or save: a value that came from
    ${VAR} shows as its reference, a literal value under a secret-looking key as ***."""
    if path in secret_paths:
        return raw
    if isinstance(resolved, dict):
        sub = raw if isinstance(raw, dict) else {}
        return {k: redact(v, sub.get(k), secret_paths, path + (k,), str(k)) for k, v in resolved.items()}
    if isinstance(resolved, list):
        sub = raw if isinstance(raw, list) else []
        return [redact(v, sub[i] if i < len(sub) else None, secret_paths, path + (i,), key)
                for i, v in enumerate(resolved)]
    if isinstance(resolved, str) and SECRET_KEYS.search(key):
        return "***"
    return resolved


def _interpolate(value: Any, env: dict[str, str], path: tuple, secret_paths: set) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env, path + (k,), secret_paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, path + (i,), secret_paths) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise SpecError(f"{key_path(path) or '(top level)'}: environment variable {name} is not set")

    secret_paths.add(path)
    return _VAR.sub(sub, value)


_EXPECTED = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "missing": "required key is missing",
    "extra_forbidden": "unknown key",
    "union_tag_not_found": f"required key is missing (one of {', '.join(POOLS)})",
    "union_tag_invalid": f"expected one of {', '.join(POOLS)}",
}


_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def describe_error(e: ValidationError, secret_paths: set = frozenset()) -> str:
    """The first validation error as one line: `key.path[0]: expected ..., got ...`."""
    err = e.errors()[0]
    # Unions name their branch, and model validators their function, in the location: not keys.
    loc = tuple(p for i, p in enumerate(err["loc"])
                if not (isinstance(p, str) and (p in {"int", "float", "none"} or p.startswith("function-")
                                                or (p in POOLS and i and isinstance(err["loc"][i - 1], int)))))
    if err["type"] == "union_tag_invalid":  # the union names the pool, not the key
        loc, err = loc + ("engine",), {**err, "input": err["ctx"]["tag"]}
    elif err["type"] == "union_tag_not_found":
        loc = loc + ("engine",)
    msg = _EXPECTED.get(err["type"]) or err["msg"].removeprefix("Value error, ")
    bound = _BOUNDS.get(err["type"])
    if bound:
        msg = f"expected a value {bound[0]} {err['ctx'][bound[1]]}"
    if err["type"] not in {"missing", "extra_forbidden"} and loc not in secret_paths and "input" in err:
        got = err["input"]
        if not isinstance(got, (dict, list)):
            shown = json.dumps(got, default=str)
            msg += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return f"{key_path(loc)}: {msg}" if loc else msg  # a spec-wide check names its keys itself


def check_models(spec: JobSpec) -> None:
    """Each pool's own checks: its model files, its engine settings against the installed engine."""
    for i, pool in enumerate(spec.workers):
        pool.check(f"workers[{i}]")
