"""All IO on user data: fsspec URLs (local paths, s3://, gs://, ...) with retries on transient errors."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import posixpath
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from pydantic import AfterValidator
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

from runner.errors import RunnerError, StorageError, first_line
from runner.storage.conditional import (
    ConditionalWritesRefused,
    PlainWrites,
    beside,
    conditional_writes,
    http_answer,
    protocols,
)

log = logging.getLogger(__name__)

def absolute_local(url: str | None) -> str | None:
    """A relative local path is taken from the current directory and made absolute, so every Ray
    worker reads the same file whatever its own working directory; URLs pass unchanged."""
    if url is None or "://" in url:
        return url
    trailing = "/" if url.endswith("/") else ""
    return os.path.abspath(os.path.expanduser(url)) + trailing


PathOrUrl = Annotated[str, AfterValidator(absolute_local)]  # a job.yaml value naming a file or a location

# Error codes an object store gives for a moment of overload or an internal fault, as botocore's own retry
# rules count them; a retry may pass. Any other code (AccessDenied, InvalidArgument, NoSuchBucket, ...) is an
# answer about the request, which a retry gets again.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "RequestLimitExceeded", "TooManyRequestsException", "BandwidthLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "OperationAborted",
    "PriorRequestNotComplete",
})
# 501 Not Implemented and 505 HTTP Version Not Supported describe the request, not the server's state.
_PERMANENT_STATUSES = frozenset({501, 505})
# OSError numbers that s3fs gives throttling and server faults when it drops the HTTP response (EBUSY: SlowDown,
# ServiceUnavailable; EREMOTEIO: InternalError), and that a network gives a moment's trouble.
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT,
                               errno.EAGAIN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN})


def _loaded(module: str, *names: str) -> tuple[type, ...]:
    """The named classes of `module` if it is imported: an error can only be one of them if it is."""
    found = sys.modules.get(module)
    return tuple(getattr(found, n) for n in names if hasattr(found, n)) if found else ()


def _transient(e: BaseException) -> bool:
    """Whether another try may pass: timeouts, connections refused or cut, throttling, HTTP 5xx. An answer
    about the request (denied, missing, invalid, 501 Not Implemented) or a bad setting is not."""
    if isinstance(e, RunnerError):  # decided already, and said
        return False
    answer = http_answer(e)
    if answer is not None:
        status, code = answer
        return code in _TRANSIENT_CODES or status == 429 or (
            status is not None and status >= 500 and status not in _PERMANENT_STATUSES)
    tls = _loaded("botocore.exceptions", "SSLError") + _loaded("aiohttp", "ClientSSLError")
    if isinstance(e, tls):  # a certificate, or https to a plain-http endpoint: a setting, not a moment
        return False
    network = (TimeoutError, ConnectionError,  # builtins: resets, refusals, timeouts (asyncio's and fsspec's too)
               *_loaded("botocore.exceptions", "ConnectionError", "HTTPClientError", "IncompleteReadError",
                        "ResponseParserError"),  # s3fs: a throttled store may answer with broken XML
               *_loaded("aiohttp", "ClientConnectionError", "ClientPayloadError", "ServerTimeoutError"))
    return isinstance(e, network) or (isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS)


def _say_retrying(state) -> None:
    """One warning per retry, so a stalled job says why: the call, the error, the wait."""
    log.warning("storage: %s failed (%s); retrying in %.1fs", getattr(state.fn, "__qualname__", "call"),
                first_line(state.outcome.exception(), 200), state.upcoming_sleep)


# Long enough to ride out an object store that is away for a minute or two.
retrying = retry(
    retry=retry_if_exception(_transient),
    wait=wait_exponential(multiplier=0.25, max=8),
    stop=stop_after_delay(180),
    before_sleep=_say_retrying,
    reraise=True,
)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(protocols(fs) & {"file", "local"})


@dataclass
class Location:
    """A directory-like prefix behind one filesystem: the output location or one input file's folder."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str
    writes: PlainWrites = field(init=False, repr=False)  # this store's conditional writes (runner.storage.conditional)

    def __post_init__(self) -> None:
        self.writes = conditional_writes(self.fs)

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> Location:
        try:
            fs, root = url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError, TypeError) as e:
            raise StorageError(f"{url}: cannot open this location ({e})") from None
        return cls(fs, root.rstrip("/"), url.rstrip("/"))

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    @retrying
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write one whole object; on a local disk through a rename, so readers never see half of it."""
        path = self.path(name)
        if is_local(self.fs):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = beside(path)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    @retrying
    def read_versioned(self, name: str) -> tuple[bytes, str | None]:
        """The object's bytes and its version, which `replace_if` and `remove_if` compare with: a hash of
        the bytes on a local disk, the ETag on S3, the generation on GCS, None on other stores."""
        return self.writes.read(self.path(name))

    @property
    def exclusive_writes(self) -> bool:
        """Whether `create` and `replace_if` are decided by this machine's kernel, so no racing writer can win
        after they return True (a local disk). Object stores decide by request headers, which an S3-compatible
        store may ignore."""
        return self.writes.exclusive

    @retrying
    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist; False when it does. Atomic on a local disk, S3 and GCS;
        elsewhere a check, then a write, so racing creators must read back to learn which one won."""
        return self._conditionally(lambda writes: writes.create(self.path(name), data))

    @retrying
    def replace_if(self, name: str, data: bytes, version: str | None) -> bool:
        """Replace `name` only if it is still at `version` (from `read_versioned`); False when it has
        changed or is gone. Atomic on a local disk, S3 and GCS; elsewhere an unconditional write."""
        return self._conditionally(lambda writes: writes.replace(self.path(name), data, version))

    @retrying
    def remove_if(self, name: str, version: str | None) -> bool:
        """Remove `name` only if it is still at `version`; False when it has changed or is gone (as
        `replace_if`)."""
        return self._conditionally(lambda writes: writes.remove(self.path(name), version))

    def _conditionally(self, write) -> bool:
        """`write(self.writes)`; on a store that refuses conditional requests (HTTP 501), said once, this
        location's writes become plain ones (a check, then a write) and `write` is made with them. Not
        retried: the store answers the same every time."""
        try:
            return write(self.writes)
        except ConditionalWritesRefused as e:
            log.warning("%s: the store refuses conditional writes (%s); using plain writes instead, which the "
                        "job lock checks by reading back", self.url, e)
            self.writes = PlainWrites(self.fs)
            return write(self.writes)

    @retrying
    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    @retrying
    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self.path(name))
        return self.fs.exists(self.path(name))

    @retrying
    def list(self, prefix: str = "") -> list[str]:
        """Names (relative to root) of the objects under `prefix`, sorted; an absent prefix is empty."""
        base = self.path(prefix) if prefix else self.root
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(p[len(root):] for p in found if p.startswith(root))

    @retrying
    def remove(self, names: list[str]) -> None:
        """Remove the objects `names`, in batches where the store has them (S3 deletes 1,000 a request); a
        name already gone is no error."""
        if not names:
            return
        paths = [self.path(n) for n in names]
        try:
            self.fs.rm(paths)
        except FileNotFoundError:  # a local disk refuses the whole call for one missing file
            for path in paths:
                if self.fs.exists(path):
                    self.fs.rm_file(path)

    @retrying
    def remove_all(self, keep: tuple[str, ...] = ()) -> None:
        for name in self.list():
            if name not in keep:
                self.fs.rm_file(self.path(name))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_table(self, name: str, table: pa.Table) -> int:
        """A Parquet object; returns its size in bytes."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(name, buf.getvalue())
        return buf.tell()

    def write_arrow(self, name: str, table: pa.Table) -> None:
        """An Arrow IPC file: for bookkeeping tables that a `*.parquet` glob over the outputs must not pick up."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
            writer.write_table(table)
        self.write_bytes(name, sink.getvalue().to_pybytes())

    def read_arrow(self, name: str) -> pa.Table:
        """What write_arrow wrote; pa.ArrowInvalid when the bytes are not an Arrow IPC file."""
        return pa.ipc.open_file(pa.BufferReader(self.read_bytes(name))).read_all()


@contextmanager
def storage_errors(what: str):
    """Turn an IO failure into a StorageError that names `what`; never swallowed."""
    try:
        yield
    except RunnerError:
        raise
    except Exception as e:
        raise StorageError(f"{what}: {describe(e)}") from e


def describe(e: BaseException, limit: int = 200) -> str:
    """An error's text on one line, with the store's HTTP status and error code when it answered. botocore's
    parameter errors span several lines, the first saying only "Parameter validation failed:"."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    text = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    status, code = http_answer(e) or (None, None)
    return f"{text} (HTTP {status} {code})" if status else text


def prime_parquet() -> None:
    """The first Parquet write in a process imports pandas and more (0.2 s of CPU or so); a worker does it
    once while its engine loads, so it never takes that time from the engine's first unit."""
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": [1]}), buf)
    pq.ParquetFile(pa.BufferReader(buf.getvalue())).read_row_groups([0])


def model_cache() -> str:
    """Where a node keeps the models it fetched: $RUNNER_CACHE, else ~/.cache/runner/models."""
    return os.environ.get("RUNNER_CACHE", os.path.expanduser("~/.cache/runner/models"))


def fetch_to_cache(url: str, storage_options: dict, cache_dir: str | None = None) -> str:
    """A local path for `url`: itself when local, else one download per node into `cache_dir` (model_cache())."""
    import fcntl
    import hashlib

    cache_dir = cache_dir or model_cache()

    fs, path = url_to_fs(url, **storage_options)
    if is_local(fs):
        return path
    target_dir = os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:16])
    target = os.path.join(target_dir, posixpath.basename(path))
    os.makedirs(target_dir, exist_ok=True)
    with open(os.path.join(target_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node, other workers wait for it
        if not os.path.exists(target):
            with storage_errors(f"{url}: cannot fetch model"):
                retrying(fs.get_file)(path, target + ".part")
            os.replace(target + ".part", target)
    return target
