"""All IO on user data: fsspec URLs (local paths, s3://, gs://, ...) with retries on transient errors."""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from pydantic import AfterValidator
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

from runner.conditional import beside, conditional_writes, protocols
from runner.errors import RunnerError, StorageError, first_line

log = logging.getLogger(__name__)

def absolute_local(url: str | None) -> str | None:
    """A relative local path is taken from the current directory and made absolute, so every Ray
    worker reads the same file whatever its own working directory; URLs pass unchanged."""
    if url is None or "://" in url:
        return url
    trailing = "/" if url.endswith("/") else ""
    return os.path.abspath(os.path.expanduser(url)) + trailing


PathOrUrl = Annotated[str, AfterValidator(absolute_local)]  # a job.yaml value naming a file or a location

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


def _transient(e: BaseException) -> bool:
    """Connection resets, timeouts, 5xx: worth another try. A missing file or denied access is not."""
    if isinstance(e, _PERMANENT) or isinstance(e, StorageError):
        return False
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or "botocore" in type(e).__module__


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

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> "Location":
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
        return conditional_writes(self.fs).read(self.path(name))

    @property
    def exclusive_writes(self) -> bool:
        """Whether `create` and `replace_if` are decided by this machine's kernel, so no racing writer can win
        after they return True (a local disk). Object stores decide by request headers, which an S3-compatible
        store may ignore."""
        return conditional_writes(self.fs).exclusive

    @retrying
    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist; False when it does. Atomic on a local disk, S3 and GCS;
        elsewhere a check, then a write, so racing creators must read back to learn which one won."""
        return conditional_writes(self.fs).create(self.path(name), data)

    @retrying
    def replace_if(self, name: str, data: bytes, version: str | None) -> bool:
        """Replace `name` only if it is still at `version` (from `read_versioned`); False when it has
        changed or is gone. Atomic on a local disk, S3 and GCS; elsewhere an unconditional write."""
        return conditional_writes(self.fs).replace(self.path(name), data, version)

    @retrying
    def remove_if(self, name: str, version: str | None) -> bool:
        """Remove `name` only if it is still at `version`; False when it has changed or is gone (as
        `replace_if`)."""
        return conditional_writes(self.fs).remove(self.path(name), version)

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
    def remove_all(self, keep: tuple[str, ...] = ()) -> None:
        for name in self.list():
            if name not in keep:
                self.fs.rm_file(self.path(name))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_table(self, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(name, buf.getvalue())

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
        detail = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise StorageError(f"{what}: {detail}") from e


def prime_parquet() -> None:
    """The first Parquet write in a process imports pandas and more (0.2 s of CPU or so); a worker does it
    once while its engine loads, so it never takes that time from the engine's first unit."""
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": [1]}), buf)
    pq.ParquetFile(pa.BufferReader(buf.getvalue())).read_row_groups([0])


def fetch_to_cache(url: str, storage_options: dict, cache_dir: str) -> str:
    """A local path for `url`: itself when local, else one download per node into `cache_dir`."""
    import fcntl
    import hashlib

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
