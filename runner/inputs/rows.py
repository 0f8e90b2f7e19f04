"""Turning a unit's input columns into engine requests: prompts or chat messages, and per-row sampling.

Whatever is wrong with one row becomes that row's error (a short kind, a colon, the detail); it
never fails the unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
from pydantic import ValidationError

from runner.spec.job import JobSpec, describe_error
from runner.spec.sampling import CONSTRAINT_KEYS, Sampling

Messages = list[dict]


@dataclass
class Rows:
    """A unit's rows as engines take them: each prompt a string, or a chat row's message list."""

    prompts: list[str | Messages | None]
    samplings: list[Sampling] | None = None  # per row; None: the job's sampling for every row
    bad: dict[int, str] = field(default_factory=dict)  # rows known to fail before any engine sees them


def read_rows(table: pa.Table, spec: JobSpec) -> Rows:
    inp = spec.input
    bad: dict[int, str] = {}
    column = table.column(inp.row_column)
    if inp.messages_column:
        rows = Rows(decode_messages(column, bad), bad=bad)
    else:
        rows = Rows(decode_prompts(column, bad), bad=bad)
    if inp.sampling_column:
        rows.samplings = decode_sampling(table.column(inp.sampling_column), spec.sampling, bad)
    return rows


def row_error(prompt: str | Messages | None) -> str | None:
    """Errors a row has before it reaches an engine."""
    if prompt is None:
        return "null_prompt: prompt is null"
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        return "empty_prompt: prompt is empty"
    return None


def decode_prompts(column: pa.ChunkedArray, bad: dict[int, str]) -> list[str | None]:
    values = column.to_pylist()
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return values
    prompts: list[str | None] = []
    for i, v in enumerate(values):
        try:
            prompts.append(None if v is None else v.decode("utf-8"))
        except UnicodeDecodeError as e:
            prompts.append("")
            bad[i] = f"invalid_utf8: prompt is not valid UTF-8 at byte {e.start}"
    return prompts


def decode_messages(column: pa.ChunkedArray, bad: dict[int, str]) -> list[Messages | None]:
    """A list<struct<role, content>> column, or JSON text of the same shape."""
    return messages_of(column.to_pylist(), bad)


def messages_of(values: list, bad: dict[int, str]) -> list[Messages | None]:
    """Each value a list of {role, content}, JSON text of one, or None; anything else is its row's
    `bad_messages` (and an empty list)."""
    out: list[Messages | None] = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError as e:
                bad[i] = f"bad_messages: not valid JSON ({e})"
                out.append([])
                continue
        problem = _messages_problem(v)
        if problem:
            bad[i] = f"bad_messages: {problem}"
            out.append([])
            continue
        out.append(None if v is None else [{"role": m["role"], "content": m["content"]} for m in v])
    return out


def _messages_problem(v) -> str | None:
    if v is None:
        return None
    if not isinstance(v, list):
        return f"expected a list of {{role, content}}, got {type(v).__name__}"
    for j, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {j}: expected {{role: string, content: string}}, got {json.dumps(m, default=str)[:80]}"
    return None


def decode_sampling(column: pa.ChunkedArray, base: Sampling, bad: dict[int, str]) -> list[Sampling]:
    """Each row's overrides (a struct, or a JSON object string) laid over the job's sampling."""
    return overrides(column.to_pylist(), base, bad)


def overrides(values: list, base: Sampling, bad: dict[int, str]) -> list[Sampling]:
    """Each row's overrides (a dict, a JSON object string, or None for none) laid over `base`; a row whose
    overrides are not valid sampling gets `bad_sampling` and `base`."""
    cache: dict[str, Sampling | str] = {}
    out: list[Sampling] = []
    for i, v in enumerate(values):
        if i in bad:  # the row already failed; its sampling is never asked
            out.append(base)
            continue
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.strip() else None
            except ValueError as e:
                v = f"not valid JSON ({e})"
        elif isinstance(v, dict):  # a struct column has every field; null means "not set here"
            v = {k: x for k, x in v.items() if x is not None}
        if v is None or v == {}:
            out.append(base)
            continue
        key = json.dumps(v, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = _override(base, v)
        result = cache[key]
        if isinstance(result, str):
            bad[i] = f"bad_sampling: {result}"
            out.append(base)
        else:
            out.append(result)
    return out


def _override(base: Sampling, v) -> Sampling | str:
    if isinstance(v, str):
        return v
    if not isinstance(v, dict):
        return f"expected an object of sampling keys, got {json.dumps(v, default=str)[:60]}"
    merged = base.model_dump()
    if set(CONSTRAINT_KEYS) & v.keys():  # a row's own constraint replaces the job's, whichever kind it is
        merged = {k: x for k, x in merged.items() if k not in CONSTRAINT_KEYS}
    try:
        return Sampling.model_validate({**merged, **v})
    except ValidationError as e:
        return describe_error(e)
