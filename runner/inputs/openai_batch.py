"""OpenAI batch files as input: JSONL request lines, planned by newline offsets, read by byte range.

Each line is `{"custom_id", "method": "POST", "url", "body"}` as the OpenAI Batch API takes it. A unit is a
range of whole lines; a worker reads only its bytes. What is wrong with one line is that row's error.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from fsspec.core import url_to_fs

from runner.errors import InputError
from runner.inputs.listing import list_inputs, reading, size_and_version
from runner.inputs.rows import Rows, overrides
from runner.inputs.units import InputFile, Plan, Unit, UnitWork, new_unit
from runner.spec.job import JobSpec
from runner.storage.location import Location, retrying, storage_errors

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
ENDPOINTS = {"generate": (CHAT, COMPLETIONS), "embed": (EMBEDDINGS,)}
CHUNK = 16 << 20  # bytes read at a time while indexing
INDEXES = "_inputs"  # where a job keeps its request files' line indexes, in its output location

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
BLANK = ("", "")  # the keys of a blank line


@dataclass(frozen=True)
class LineIndex:
    """One file's lines: `starts[i]` is line i's first byte and `starts[-1]` the end of the last one."""

    starts: np.ndarray
    keys: list[tuple[str | None, str | None]]  # (custom_id, url) of each line that parses; (None, None) else

    @property
    def lines(self) -> int:
        return len(self.starts) - 1


def plan_batch_files(spec: JobSpec) -> Plan:
    """Index every request file (one pass each, or its index kept in the output location by an earlier run
    while the file's size and version are the same), refuse a file no line of which suits the task, and cut
    units of unit_rows lines. A custom_id seen before (in file order, then line order) marks its row."""
    listed = list_inputs(spec.input.path, spec.input.storage_options, suffix=".jsonl")
    kept = Location.open(spec.output.path, spec.output.storage_options)
    with ThreadPoolExecutor(max_workers=min(8, len(listed))) as pool:
        indexes = list(pool.map(lambda item: _index(spec, kept, *item), listed))
    first_seen: dict[str, tuple[str, int]] = {}  # custom_id -> (file, line) where it first appears
    files, units, new = [], [], {}
    for i, ((url, _), (f, index, fresh)) in enumerate(zip(listed, indexes)):
        if fresh:
            new[url] = index
        _check_endpoints(spec, url, index)
        repeats = {}
        for line, (cid, _) in enumerate(index.keys):
            if cid is not None and first_seen.setdefault(cid, (url, line)) != (url, line):
                first_url, first_line = first_seen[cid]
                repeats[line] = f"line {first_line + 1} of {first_url}"
        files.append(f)
        units += cut_line_units(i, f, index, repeats, spec.unit_rows)
    return Plan(tuple(files), tuple(units), new)


def _index(spec: JobSpec, kept: Location, url: str, listed: dict) -> tuple[InputFile, LineIndex, bool]:
    """The file's identity and line index, and whether the index was read from the file (not kept)."""
    size, version = size_and_version(url, spec.input.storage_options, listed)
    index = kept_index(kept, url, size, version)
    fresh = index is None
    if fresh:
        fs, path = url_to_fs(url, **spec.input.storage_options)
        with reading(url):
            index = index_lines(fs, path)
    return InputFile(url, index.lines, (index.lines,), size, version), index, fresh


def _kept_name(url: str) -> str:
    return f"{INDEXES}/{hashlib.sha256(url.encode()).hexdigest()[:20]}.arrow"


def kept_index(loc: Location, url: str, size: int, version: str) -> LineIndex | None:
    """The index an earlier run kept for this file, if the file still has that size and version token."""
    if not version:  # a store without version tokens: only reading the file again is sure
        return None
    try:
        table = loc.read_arrow(_kept_name(url))
    except (OSError, pa.ArrowInvalid):  # none kept, or unreadable: the file is read again
        return None
    meta = table.schema.metadata or {}
    if (meta.get(b"url"), meta.get(b"size"), meta.get(b"version")) != (url.encode(), str(size).encode(), version.encode()):
        return None
    starts = np.concatenate([table.column("start").to_numpy(), [int(meta[b"end"])]])
    return LineIndex(starts, list(zip(table.column("custom_id").to_pylist(), table.column("url").to_pylist())))


def keep_indexes(loc: Location, plan: Plan) -> None:
    """Keep the plan's new line indexes in the output location (`_inputs/`), each with its file's identity."""
    files = {f.url: f for f in plan.files}
    for url, index in plan.new_indexes.items():
        f = files[url]
        ids, urls = zip(*index.keys) if index.keys else ((), ())
        table = pa.table({"start": pa.array(index.starts[:-1], pa.int64()), "custom_id": pa.array(ids, pa.string()),
                          "url": pa.array(urls, pa.string()).dictionary_encode()})
        table = table.replace_schema_metadata({"url": url, "size": str(f.size), "version": f.version,
                                               "end": str(int(index.starts[-1]))})
        with storage_errors(f"{loc.url_of(_kept_name(url))}: cannot keep the line index of {url}"):
            loc.write_arrow(_kept_name(url), table)


@retrying
def index_lines(fs, path: str) -> LineIndex:
    """One pass over the file: each line's start, and its custom_id and url where it parses. Blank lines at
    the end of the file are not lines; a blank line before the last request is (a row error)."""
    starts, keys, offset, tail = [0], [], 0, b""
    with fs.open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            buf = tail + chunk
            ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10)
            base = offset - len(tail)
            prev = 0
            for e in ends.tolist():
                keys.append(_keys(buf[prev:e]))
                prev = e + 1
            starts.extend((ends + 1 + base).tolist())
            tail, offset = buf[prev:], offset + len(chunk)
    if tail:
        keys.append(_keys(tail))
        starts.append(offset)
    while keys and keys[-1] == BLANK:  # trailing blank lines
        keys.pop()
        starts.pop()
    return LineIndex(np.asarray(starts, np.int64), keys)


def _keys(line: bytes) -> tuple[str | None, str | None]:
    if not line.strip():
        return BLANK
    try:
        obj = json.loads(line)
    except ValueError:
        return (None, None)
    if not isinstance(obj, dict):
        return (None, None)
    cid = obj.get("custom_id")
    return (cid if isinstance(cid, str) and cid else None, obj.get("url") if isinstance(obj.get("url"), str) else None)


def _check_endpoints(spec: JobSpec, url: str, index: LineIndex) -> None:
    """A file none of whose requests this job's task answers is the spec's mistake, said once at validate."""
    asked = Counter(u for _, u in index.keys if u)
    if asked and not set(asked) & set(ENDPOINTS[spec.task]):
        top = asked.most_common(1)[0][0]
        fix = "set task: embed" if top == EMBEDDINGS else ("set task: generate" if top in ENDPOINTS["generate"]
                                                           else f"expected one of {', '.join(ENDPOINTS[spec.task])}")
        raise InputError(f"{url}: its requests ask for {top}, which a task {spec.task} job does not answer; {fix}")


def cut_line_units(file_index: int, f: InputFile, index: LineIndex, repeats: dict[int, str],
                   unit_rows: int) -> list[Unit]:
    """Units of unit_rows whole lines; each carries its rows that repeat an earlier custom_id."""
    mine: dict[int, list] = defaultdict(list)
    for line, where in sorted(repeats.items()):
        mine[line // unit_rows].append((line % unit_rows, where))
    return [new_unit(file_index, f.url, start, min(unit_rows, index.lines - start),
                     byte_range=(int(index.starts[start]), int(index.starts[min(start + unit_rows, index.lines)])),
                     repeats=tuple(mine[start // unit_rows]))
            for start in range(0, index.lines, unit_rows)]


class BatchFileReader:
    """Reads a unit's lines (its byte range only) and turns each into a row, or a row error."""

    def __init__(self, spec: JobSpec):
        self.spec = spec

    @retrying
    def _read(self, url: str, start: int, end: int) -> bytes:
        fs, path = url_to_fs(url, **self.spec.input.storage_options)
        with fs.open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def read(self, unit: Unit, attempt: int) -> UnitWork:
        start, end = unit.byte_range
        try:
            data = self._read(unit.source_file, start, end)
        except FileNotFoundError as e:
            raise InputError(f"{unit.source_file}: cannot read lines {unit.row_start + 1}+{unit.num_rows} ({e})") from e
        lines = (data[:-1] if data.endswith(b"\n") else data).split(b"\n")
        if len(data) != end - start or len(lines) != unit.num_rows:
            raise InputError(f"{unit.source_file}: lines {unit.row_start + 1}+{unit.num_rows} are not where they "
                             "were planned; the file changed while the job ran")
        return self.to_work(unit, attempt, lines)

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
        got = "nothing" if value is None else f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
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
