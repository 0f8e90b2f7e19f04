"""A job's committed rows as the OpenAI Batch API's result files: output.jsonl, errors.jsonl and batch.json.

Each body is the object the OpenAI API returns for the line's url (`chat.completion`, `text_completion`, or an
embedding `list`), usage included. Ids are derived from the job and the row, so exporting twice gives the same
files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq
from pydantic import ValidationError

from runner.errors import InputError, first_line
from runner.inputs.formats import input_format
from runner.inputs.openai_batch import CHAT, COMPLETIONS, EMBEDDINGS
from runner.output.ledger import Ledger
from runner.output.store import UnitStats
from runner.spec.job import JobSpec
from runner.spec.pools import PoolBase
from runner.storage.location import Location, retrying, storage_errors
from runner.storage.names import JOB, MANIFEST, SUCCESS

log = logging.getLogger(__name__)

OUTPUT, ERRORS, BATCH = "output.jsonl", "errors.jsonl", "batch.json"
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}


@dataclass
class Exported:
    """What an export wrote: the request counts, as the OpenAI Batch object gives them."""

    total: int
    completed: int
    failed: int
    dest: str
    job_succeeded: bool


def export_openai_batch(source: Location, dest: Location) -> Exported:
    """Write the committed rows of the job at `source` into `dest` as OpenAI batch result files."""
    with storage_errors(f"{source.url}: cannot read the job"):
        if not source.exists(JOB):
            raise InputError(f"{source.url}: holds no runner job (no {JOB})")
        job = JobView(source.read_json(JOB), source.url)
        ledger = Ledger.load(source)  # read-only: never rolls
        succeeded = source.exists(SUCCESS)
        manifest = source.read_json(MANIFEST) if source.exists(MANIFEST) else {}
    counts, urls = {"completed": 0, "failed": 0}, Counter()
    with storage_errors(f"{dest.url}: cannot write the export"):
        dest.fs.makedirs(dest.root, exist_ok=True)
        with dest.fs.open(dest.path(OUTPUT), "w") as out, dest.fs.open(dest.path(ERRORS), "w") as err:
            for stats, row in _rows(source, ledger.stats):
                custom_id, url = job.request_of(row)
                ok = row["error"] is None
                line = job.result_line(row, stats, custom_id, url) if ok else job.error_line(row, custom_id)
                (out if ok else err).write(json.dumps(line, ensure_ascii=False) + "\n")
                counts["completed" if ok else "failed"] += 1
                urls[url] += 1
        total = counts["completed"] + counts["failed"]
        endpoint = urls.most_common(1)[0][0] if urls else job.default_url
        dest.write_json(BATCH, job.batch_object(endpoint, counts, succeeded, manifest, ledger.stats))
    if not succeeded:
        log.warning("%s: the job has not finished (%d of %d rows committed); exported what is committed",
                    source.url, total, job.rows)
    return Exported(total, counts["completed"], counts["failed"], dest.url, succeeded)


def _rows(source: Location, stats: list[UnitStats]) -> Iterator[tuple[UnitStats, dict]]:
    """Every committed row with its unit's stats, a file at a time: units in id order, each file's units
    (in id order, as they were written into it) read from that file, a unit's rows taken by its row count."""
    by_file: dict[str, list[UnitStats]] = {}
    for s in stats:
        by_file.setdefault(s.data_name, []).append(s)
    for name, units in by_file.items():
        rows = (row for batch in _parts(source, name) for row in batch.to_pylist())
        for s in units:
            for _ in range(s.rows):
                yield s, next(rows)


@retrying
def _parts(source: Location, name: str) -> list:
    # One thread, nothing read ahead, the file closed here: an Arrow reader thread still alive when the
    # interpreter exits aborts the process (apache/arrow#34314), after the files were written.
    with source.fs.open(source.path(name), "rb") as f, pq.ParquetFile(f, pre_buffer=False) as part:
        return part.read(use_threads=False).to_batches(max_chunksize=4096)


class JobView:
    """What the export needs of a job: its recorded spec (task, input, pools) and how a row names its request."""

    def __init__(self, record: dict, where: str):
        try:
            spec = JobSpec.model_validate(record["spec"])
        except (KeyError, TypeError, ValidationError) as e:
            raise InputError(f"{where}/{JOB}: not a job spec runner can read ({first_line(e)})") from None
        self.name, self.fingerprint, self.rows = spec.name, record.get("fingerprint", ""), record.get("rows", 0)
        fmt = input_format(spec)
        self.id_column, self.endpoint_column = fmt.id_column, fmt.endpoint_column
        self.default_url = (EMBEDDINGS if spec.task == "embed" else CHAT if spec.input.messages_column
                            else COMPLETIONS)
        self.models = {name: _model_name(pool) for name, pool in zip(spec.pool_names(), spec.workers, strict=True)}

    def request_of(self, row: dict) -> tuple[str | None, str]:
        """(custom_id, url) of an output row: its input format's id column (an OpenAI batch line's custom_id),
        else its file and row; the url its endpoint column holds, else the one the job's task stands for."""
        url = (row.get(self.endpoint_column) if self.endpoint_column else None) or self.default_url
        if self.id_column:
            value = row[self.id_column]
            return (None if value is None else str(value)), url
        return f"{posixpath.basename(row['source_file'])}:{row['source_row']}", url

    def _hash(self, row: dict, salt: str) -> str:
        key = f"{self.fingerprint}:{salt}:{row['source_file']}:{row['source_row']}"
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    def result_line(self, row: dict, stats: UnitStats, custom_id: str | None, url: str) -> dict:
        model = self.models.get(stats.pool, stats.pool)
        body = (embedding_body(row, model) if url == EMBEDDINGS else
                completion_body(row, model, url, self._hash(row, "body"), int(stats.finished_at)))
        return {"id": f"batch_req_{self._hash(row, 'id')}", "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": f"req_{self._hash(row, 'request')}", "body": body},
                "error": None}

    def error_line(self, row: dict, custom_id: str | None) -> dict:
        code, _, message = row["error"].partition(":")
        return {"id": f"batch_req_{self._hash(row, 'id')}", "custom_id": custom_id, "response": None,
                "error": {"code": code.strip(), "message": message.strip() or code.strip()}}

    def batch_object(self, endpoint: str, counts: dict, succeeded: bool, manifest: dict,
                     stats: list[UnitStats]) -> dict:
        """The OpenAI Batch object of the export: its request counts, token usage and files; `endpoint`: the
        url most of its requests asked for."""
        started = min((s.started_at for s in stats), default=0.0)
        finished = max((s.finished_at for s in stats), default=0.0)
        prompt, generated = sum(s.prompt_tokens for s in stats), sum(s.completion_tokens for s in stats)
        usage = {"input_tokens": prompt, "output_tokens": generated, "total_tokens": prompt + generated,
                 "input_tokens_details": {"cached_tokens": sum(s.prompt_tokens_reused for s in stats)},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        return {"id": f"batch_{self.fingerprint}", "object": "batch", "endpoint": endpoint, "usage": usage,
                "model": ",".join(sorted(set(self.models.values()))),
                "input_file_id": self.name, "completion_window": "24h",
                "status": "completed" if succeeded else "in_progress", "output_file_id": OUTPUT,
                "error_file_id": ERRORS, "created_at": int(started), "in_progress_at": int(started),
                "completed_at": int(finished) if succeeded else None,
                "request_counts": {"total": counts["completed"] + counts["failed"], **counts},
                "metadata": {"job": self.name, "run_id": str(manifest.get("run_id", ""))}}


def _model_name(pool: PoolBase) -> str:
    model = getattr(pool, "model", None)
    return posixpath.basename(str(model).rstrip("/")) if model else pool.engine


def _finish(reason: str | None) -> str:
    return reason if reason in FINISH_REASONS else "stop"


def completion_body(row: dict, model: str, url: str, key: str, created: int) -> dict:
    """A `chat.completion` or `text_completion` object, every choice included."""
    choices = row.get("choices") or [{"text": row["text"], "finish_reason": row["finish_reason"],
                                      "completion_tokens": row["completion_tokens"]}]
    logprobs = row.get("logprobs")
    chat = url == CHAT
    out = []
    for i, c in enumerate(choices):
        lp = logprobs if i == 0 and logprobs is not None else None  # runner keeps the first choice's only
        if chat:
            out.append({"index": i, "message": {"role": "assistant", "content": c["text"], "refusal": None},
                        "finish_reason": _finish(c["finish_reason"]), "logprobs": chat_logprobs(lp)})
        else:
            out.append({"index": i, "text": c["text"], "finish_reason": _finish(c["finish_reason"]),
                        "logprobs": completion_logprobs(lp)})
    generated = sum(c["completion_tokens"] or 0 for c in choices)
    prompt = row["prompt_tokens"] or 0
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{key}", "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": out,
            "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}}


def chat_logprobs(lp: list | None) -> dict | None:
    if lp is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(t["token"], t["logprob"]),
                         "top_logprobs": [entry(a["token"], a["logprob"]) for a in t["top_logprobs"] or []]}
                        for t in lp], "refusal": None}


def completion_logprobs(lp: list | None) -> dict | None:
    if lp is None:
        return None
    offsets, at = [], 0
    for t in lp:
        offsets.append(at)
        at += len(t["token"])
    return {"tokens": [t["token"] for t in lp], "token_logprobs": [t["logprob"] for t in lp],
            "top_logprobs": [{a["token"]: a["logprob"] for a in t["top_logprobs"] or []} for t in lp],
            "text_offset": offsets}


def embedding_body(row: dict, model: str) -> dict:
    """An embedding `list` object with the row's one vector."""
    tokens = row["prompt_tokens"] or 0
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": list(row["embedding"])}],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
