"""OpenAI batch files as input: JSONL request lines, planned by newline offsets, read by byte range.

Each line is `{"custom_id", "method": "POST", "url", "body"}` as the OpenAI Batch API takes it. A unit is a
range of whole lines (runner.inputs.lines); a worker reads only its bytes. What is wrong with one line is that
row's error.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from fsspec.core import url_to_fs

from runner.errors import InputError
from runner.inputs.lines import BLANK, LineFormat, LineIndex, LineReader, cut_line_units, index_lines, line_object
from runner.inputs.listing import reading
from runner.inputs.rows import Rows, overrides
from runner.inputs.units import Plan, Unit, UnitWork
from runner.spec.job import JobSpec

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
ENDPOINTS = {"generate": (CHAT, COMPLETIONS), "embed": (EMBEDDINGS,)}

# Body keys that are each row's sampling, by the Sampling key they set. `model` is the pool's to say.
SAMPLING_KEYS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
                 "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed", "n": "n",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                 "repetition_penalty": "repeat_penalty", "response_format": "response_format"}
# Body keys that change nothing in a batch (who asked, where a hosted service stores it), the row itself, and
# keys read below. Any other key with a value is a row error: runner does not do what it asks.
NOT_SAMPLING = {"model", "user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls",
                "messages", "prompt", "input", "stop", "logprobs", "top_logprobs"}
HARMLESS = {"stream": (False,), "echo": (False,), "best_of": (1,), "encoding_format": ("float",)}


class OpenAIBatchFormat(LineFormat):
    """openai_batch: JSONL request files as the OpenAI Batch API takes them. A line's body is its row and its
    sampling; its custom_id and url are copied to the output, and the manifest counts requests as the API does."""

    @property
    def copied_columns(self) -> list[str]:
        return ["custom_id", "url"]

    @property
    def id_column(self) -> str:
        return "custom_id"

    @property
    def endpoint_column(self) -> str:
        return "url"

    @property
    def per_row_sampling(self) -> bool:
        return True

    @property
    def request_counts(self) -> bool:
        return True

    def index(self, fs, path: str) -> LineIndex:
        return index_lines(fs, path, _keys)

    def plan(self) -> Plan:
        """Index every request file, refuse a file no line of which suits the task, and cut units of unit_rows
        lines. A custom_id seen before (in file order, then line order) marks its row."""
        files, units, new, indexed = [], [], {}, self.indexed()
        repeats = find_repeats(self.spec, [(f.url, index) for f, index, _ in indexed])
        for i, (f, index, fresh) in enumerate(indexed):
            if fresh:
                new[f.url] = index
            _check_endpoints(self.spec, f.url, index)
            files.append(f)
            units += cut_line_units(i, f, index, self.spec.unit_rows, repeats.get(i, {}))
        return Plan(tuple(files), tuple(units), new)

    def reader(self) -> BatchFileReader:
        return BatchFileReader(self.spec)


def _keys(line: bytes) -> tuple[str | None, str | None]:
    if not line.strip():
        return BLANK
    obj = line_object(line)
    if obj is None:
        return (None, None)
    cid = obj.get("custom_id")
    return (cid if isinstance(cid, str) and cid else None, obj.get("url") if isinstance(obj.get("url"), str) else None)


def find_repeats(spec: JobSpec, indexes: list[tuple[str, LineIndex]]) -> dict[int, dict[int, str]]:
    """{file: {line: where its custom_id first appears}} for every line whose custom_id an earlier line has (in
    file order, then line order). From the indexes' hashes, sorted: a few arrays of 8 bytes a line, not every
    id in memory; the lines of equal hashes are then read, so only ids that are truly equal count."""
    if not indexes:
        return {}
    ids = np.concatenate([index.ids for _, index in indexes])
    where = np.concatenate([np.full(index.lines, i, np.int64) * (1 << 40) + np.arange(index.lines)
                            for i, (_, index) in enumerate(indexes)])  # file, line: their order as one number
    keep = ids != 0
    ids, where = ids[keep], where[keep]
    order = np.argsort(ids, kind="stable")  # equal ids stay in file, line order
    ids, where = ids[order], where[order]
    same = np.flatnonzero(ids[1:] == ids[:-1])
    if not len(same):
        return {}
    candidates = sorted(set(where[same].tolist()) | set(where[same + 1].tolist()))
    first: dict[str, int] = {}
    repeats: dict[int, dict[int, str]] = {}
    for at, cid in zip(candidates, _custom_ids(spec, indexes, candidates), strict=True):
        seen = first.setdefault(cid, at)
        if seen != at:
            url, line = indexes[seen >> 40][0], seen & ((1 << 40) - 1)
            repeats.setdefault(at >> 40, {})[at & ((1 << 40) - 1)] = f"line {line + 1} of {url}"
    return repeats


def _custom_ids(spec: JobSpec, indexes: list[tuple[str, LineIndex]], at: list[int]) -> list[str]:
    """The custom_id of each line `at` names (file << 40 | line), read by its byte range."""
    out = []
    for i in sorted({a >> 40 for a in at}):
        url, index = indexes[i]
        fs, path = url_to_fs(url, **spec.input.storage_options)
        with reading(url), fs.open(path, "rb") as f:
            for a in (a for a in at if a >> 40 == i):
                line = a & ((1 << 40) - 1)
                f.seek(int(index.starts[line]))
                out.append(_keys(f.read(int(index.starts[line + 1] - index.starts[line])).rstrip(b"\r\n"))[0])
    return out


def _check_endpoints(spec: JobSpec, url: str, index: LineIndex) -> None:
    """A file none of whose requests this job's task answers is the spec's mistake, said once at validate."""
    asked = Counter(index.tag_counts())
    if asked and not set(asked) & set(ENDPOINTS[spec.task]):
        top = asked.most_common(1)[0][0]
        fix = "set task: embed" if top == EMBEDDINGS else ("set task: generate" if top in ENDPOINTS["generate"]
                                                           else f"expected one of {', '.join(ENDPOINTS[spec.task])}")
        raise InputError(f"{url}: its requests ask for {top}, which a task {spec.task} job does not answer; {fix}")


class BatchFileReader(LineReader):
    """Turns each request line of a unit into a row, or a row error."""

    def to_work(self, unit: Unit, attempt: int, lines: list[bytes]) -> UnitWork:
        bad: dict[int, str] = {}
        repeats = dict(unit.repeats)
        ids, urls, prompts, asked = [], [], [], []
        for row, raw in enumerate(lines):
            req = decode_line(raw, unit.row_start + row + 1, self.spec.task)
            if isinstance(req, str):
                bad[row] = req
                req = BatchRequest(_salvage_id(raw), None, "", None)
            elif row in repeats:
                bad[row] = f"duplicate_custom_id: {req.custom_id!r} is already the custom_id at {repeats[row]}"
            ids.append(req.custom_id)
            urls.append(req.url)
            prompts.append(req.prompt)
            asked.append(req.sampling)
        samplings = overrides(asked, self.spec.sampling, bad) if any(asked) else None
        inputs = pa.table({"custom_id": pa.array(ids, pa.string()), "url": pa.array(urls, pa.string())})
        return UnitWork(unit, attempt, inputs, Rows(prompts, samplings=samplings, bad=bad))


@dataclass(frozen=True)
class BatchRequest:
    custom_id: str | None
    url: str | None
    prompt: str | list[dict]
    sampling: dict | None  # the body's sampling keys, as Sampling names them; None: the job's


def _salvage_id(raw: bytes) -> str | None:
    """A failed line's custom_id where it has one, so errors.jsonl can name the request."""
    try:
        cid = json.loads(raw).get("custom_id")
        return cid if isinstance(cid, str) else None
    except (ValueError, AttributeError):
        return None


def decode_line(raw: bytes, line: int, task: str) -> BatchRequest | str:
    """One request line as a row, or the row's error (`kind: detail`)."""
    if not raw.strip():
        return f"bad_line: line {line} is empty"
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return f"bad_json: line {line} is not valid JSON ({e})"
    if not isinstance(obj, dict):
        return f"bad_line: line {line}: expected a JSON object, got {type(obj).__name__}"
    cid, url, method, body = obj.get("custom_id"), obj.get("url"), obj.get("method", "POST"), obj.get("body")
    if not isinstance(cid, str) or not cid:
        return f"missing_custom_id: line {line} has no custom_id (a non-empty string)"
    if url not in ENDPOINTS[task]:
        return f"wrong_url: line {line} asks for {url!r}; a task {task} job answers {' and '.join(ENDPOINTS[task])}"
    if method != "POST":
        return f"wrong_method: line {line}: method {method!r}; batch requests are POST"
    if not isinstance(body, dict):
        return f"bad_body: line {line}: body is {type(body).__name__}, expected an object"
    try:
        prompt = _prompt(body, url)
        sampling = body_sampling(body, url)
    except _Refused as e:
        return f"{e.kind}: line {line}: {e}"
    return BatchRequest(cid, url, prompt, sampling)


class _Refused(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _prompt(body: dict, url: str) -> str | list[dict]:
    """The row: chat messages, a completion prompt, or an embedding input."""
    if url == CHAT:
        return _messages(body.get("messages"))
    key = "prompt" if url == COMPLETIONS else "input"
    value = body.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        got = ("nothing" if value is None else f"a list of {len(value)}" if isinstance(value, list)
               else type(value).__name__)
        raise _Refused("bad_body", f"body.{key}: expected one string per line, got {got}")
    return value


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _Refused("bad_body", "body.messages: expected a non-empty list of {role, content}")
    out = []
    for j, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise _Refused("unsupported_parameter", f"body.messages[{j}].content: only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str) or not isinstance(m.get("role"), str):
            raise _Refused("bad_body", f"body.messages[{j}]: expected {{role: string, content: string or text parts}}")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def body_sampling(body: dict, url: str) -> dict | None:
    """The body's sampling as Sampling keys (None: the job's); raises _Refused for what runner cannot do.
    Values are checked when they are laid over the job's sampling (a bad one is `bad_sampling`)."""
    for key, value in body.items():
        harmless = key in SAMPLING_KEYS or key in NOT_SAMPLING or value in (None, False, [], {}) \
            or value in HARMLESS.get(key, ())
        if not harmless:
            raise _Refused("unsupported_parameter", f"body.{key} is not supported (got {json.dumps(value)[:40]})")
    out = {SAMPLING_KEYS[k]: v for k, v in body.items() if k in SAMPLING_KEYS and v is not None}
    if body.get("max_completion_tokens") is not None:
        out["max_tokens"] = body["max_completion_tokens"]  # the newer name wins
    stop = body.get("stop")
    if stop is not None:
        out["stop"] = [stop] if isinstance(stop, str) else stop
    if url == CHAT and body.get("logprobs"):
        out["logprobs"] = max(1, body.get("top_logprobs") or 0)  # the chosen token's needs a top-1 at least
    elif url == COMPLETIONS and body.get("logprobs"):
        out["logprobs"] = body["logprobs"]
    return out or None
