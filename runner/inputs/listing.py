"""Listing input files and reading each one's size and version through fsspec."""

from __future__ import annotations

import posixpath
from contextlib import contextmanager
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol

from runner.errors import InputError, RunnerError, StorageError
from runner.storage.location import describe, retrying

_GLOB = set("*?[")


# Where a store's listing keeps its version token, best first, and the kind each is recorded as: an object
# store's token changes with every write of the object; a modification time is the fallback.
_VERSION_KEYS = (("ETag", "etag"), ("etag", "etag"), ("generation", "generation"), ("mtime", "mtime"),
                 ("LastModified", "mtime"), ("last_modified", "mtime"), ("updated", "mtime"))




def list_inputs(url: str, storage_options: dict, suffix: str = ".parquet") -> list[tuple[str, dict]]:
    """The input files' urls, sorted, each with the details its listing gave (size, version token, ...);
    a directory stands for every `*<suffix>` file below it."""
    fs, path = url_to_fs(url, **storage_options)
    protocol = get_protocol(url)
    try:
        if _GLOB & set(path):
            found = {p: d for p, d in fs.glob(path, detail=True).items() if d.get("type") == "file"}
        elif _isdir(fs, path):
            found = {p: d for p, d in fs.find(path, detail=True).items()
                     if p.endswith(suffix) and not _hidden(p, path)}
            if not found:
                raise InputError(f"input.path: no *{suffix} files under {url}")
        else:
            found = {path: fs.info(path)}
    except FileNotFoundError:
        raise InputError(f"input.path: {url} does not exist") from None
    except RunnerError:
        raise
    except Exception as e:  # OSError, and an object store client's own errors (unreachable endpoint, auth)
        raise StorageError(f"input.path: cannot list {url}: {describe(e)}") from None
    if not found:
        raise InputError(f"input.path: no files match {url}")
    return [(_with_protocol(protocol, p), found[p]) for p in sorted(found)]


def _isdir(fs, path: str) -> bool:
    fs.invalidate_cache(path)
    return fs.isdir(path)


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root)
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def _with_protocol(protocol: str, path: str) -> str:
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


@retrying
def _footer(fs, path: str) -> pq.FileMetaData:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata


@retrying
def _info(fs, path: str) -> dict:
    return fs.info(path)


@contextmanager
def reading(url: str):
    """Turn a failed read of an input file into an InputError or StorageError that names it."""
    try:
        yield
    except pa.ArrowInvalid as e:
        raise InputError(f"{url}: not a readable Parquet file ({e})") from None
    except FileNotFoundError:
        raise InputError(f"{url}: does not exist") from None
    except OSError as e:
        raise StorageError(f"{url}: cannot read: {describe(e)}") from None


def size_and_version(url: str, storage_options: dict, listed: dict) -> tuple[int, str]:
    """The file's size and version token from its listing's details, else from one `info` call."""
    details = listed
    if details.get("size") is None or not _version(details):
        fs, path = url_to_fs(url, **storage_options)
        with reading(url):
            details = _info(fs, path)
    return int(details.get("size") or 0), _version(details)


def _version(details: dict) -> str:
    for key, kind in _VERSION_KEYS:
        value = details.get(key)
        if value in (None, ""):
            continue
        if kind == "mtime" and isinstance(value, (int, float)):  # a local file's: seconds since the epoch
            value = datetime.fromtimestamp(value, timezone.utc)
        return f"{kind}:{value.isoformat() if isinstance(value, datetime) else value}"
    return ""
