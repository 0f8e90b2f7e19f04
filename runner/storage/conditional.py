"""Conditional writes, one class per kind of store: create an object only if absent, replace or remove it only
if unchanged since it was read. The job lock is built on them (runner.output.lock)."""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import uuid

import fsspec
from fsspec.asyn import sync


def protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return set(fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


class ConditionalWritesRefused(Exception):
    """The store answered a conditional request with HTTP 501 Not Implemented: it has no conditional writes
    (some S3-compatible stores). Location falls back to plain writes on it."""


def http_answer(e: BaseException) -> tuple[int | None, str | None] | None:
    """The HTTP status and error code an object store answered with: from a botocore ClientError, or the one
    s3fs keeps as the cause of the OSError it translates it into; None when the store gave no answer."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return (response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                    response.get("Error", {}).get("Code"))
    return None


def beside(path: str) -> str:
    """A fresh hidden name next to `path`, for a temp file that is linked or renamed into place."""
    return posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}")


class PlainWrites:
    """Conditional writes (create if absent; replace or remove only the version read) on a store that has
    none: a check, then a plain write. Of racing writers the last one wins, so callers read back."""

    exclusive = False  # whether the store itself refuses the second of two racing writers

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str | None]:
        return self.fs.cat_file(path), None

    def create(self, path: str, data: bytes) -> bool:
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return True

    def replace(self, path: str, data: bytes, version: str | None) -> bool:
        self.fs.pipe_file(path, data)
        return True

    def remove(self, path: str, version: str | None) -> bool:
        self.fs.rm_file(path)
        return True


class _LocalWrites(PlainWrites):
    """A local (or NFS) disk, where fsspec has no exclusive create: os.link of a finished temp file creates,
    and fails when the name exists; a replace or remove first renames the file away, which only one of
    racing callers can do, and puts it back when it was not the version read (a hash of its bytes). A
    replace leaves the name absent for a moment: a creator in that moment wins, and the replace says False."""

    exclusive = True  # the kernel's link and rename decide, on this machine's own disk

    def read(self, path: str) -> tuple[bytes, str | None]:
        data = self.fs.cat_file(path)
        return data, hashlib.sha256(data).hexdigest()

    def create(self, path: str, data: bytes) -> bool:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = beside(path)
        self.fs.pipe_file(tmp, data)
        try:
            return self._link(tmp, path, data)
        finally:
            os.unlink(tmp)

    @staticmethod
    def _link(src: str, path: str, data: bytes) -> bool:
        """Give the finished file `src` (holding `data`) the name `path` too, unless it exists."""
        try:
            os.link(src, path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        # A disk without hard links (some FUSE and SMB mounts): O_EXCL, so a reader may find the file
        # empty for the moment between its creation and its one write.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def replace(self, path: str, data: bytes, version: str | None) -> bool:
        return self.remove(path, version) and self.create(path, data)

    def remove(self, path: str, version: str | None) -> bool:
        taken = beside(path)
        try:
            os.rename(path, taken)
        except FileNotFoundError:
            return False
        try:
            data, found = self.read(taken)
            if found == version:
                return True
            self._link(taken, path, data)  # not the version read: put it back, unless a newer one is there
            return False
        finally:
            os.unlink(taken)


class _S3Writes(PlainWrites):
    """S3's conditional requests: PUT with If-None-Match: * creates, PUT and DELETE with If-Match: <ETag>
    replace or remove only the version read; a failed precondition is HTTP 412 (moto enforces both). A store
    without them may ignore the headers (the lock's read-back covers that) or refuse them with 501
    (ConditionalWritesRefused)."""

    def read(self, path: str) -> tuple[bytes, str | None]:
        return sync(self.fs.loop, self._get, path)

    async def _get(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await resp["Body"].read(), resp["ETag"]
        finally:
            resp["Body"].close()

    def create(self, path: str, data: bytes) -> bool:
        return self._call_if("put_object", path, Body=data, IfNoneMatch="*")

    def replace(self, path: str, data: bytes, version: str | None) -> bool:
        return self._call_if("put_object", path, Body=data, IfMatch=version)

    def remove(self, path: str, version: str | None) -> bool:
        return self._call_if("delete_object", path, IfMatch=version)

    def _call_if(self, method: str, path: str, **kwargs) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
            return True
        except OSError as e:  # s3fs translates the ClientError and keeps it as the cause
            status, code = http_answer(e) or (None, None)
            if code == "PreconditionFailed" or (code == "NoSuchKey" and "IfMatch" in kwargs):
                return False
            if status == 501 or code == "NotImplemented":
                header = "If-None-Match" if "IfNoneMatch" in kwargs else "If-Match"
                raise ConditionalWritesRefused(f"HTTP {status} {code} to a {method} with {header}") from e
            raise
        finally:
            self.fs.invalidate_cache(path)


class _GCSWrites(PlainWrites):
    """Google Cloud Storage's generation preconditions (ifGenerationMatch; 0: no live object), through
    gcsfs's JSON API calls. Written from the API docs and not run here: gcsfs is not installed."""

    def read(self, path: str) -> tuple[bytes, str | None]:
        bucket, key, _ = self.fs.split_path(path)
        meta = self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
        generation = str(meta["generation"])  # then the bytes of exactly that generation
        _, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=generation)
        return data, generation

    def create(self, path: str, data: bytes) -> bool:
        return self._upload(path, data, "0")

    def replace(self, path: str, data: bytes, version: str | None) -> bool:
        return self._upload(path, data, version)

    def remove(self, path: str, version: str | None) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            return self._call_if("DELETE", "b/{}/o/{}", bucket, key, path=path, ifGenerationMatch=version)
        except FileNotFoundError:
            return False

    def _upload(self, path: str, data: bytes, generation: str | None) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        upload = self.fs.base.replace("/storage/v1/", "/upload/storage/v1/", 1) + "b/{}/o"
        return self._call_if("POST", upload, bucket, path=path, uploadType="media", name=key, data=data,
                             ifGenerationMatch=generation, headers={"Content-Type": "application/octet-stream"})

    def _call_if(self, method: str, url: str, *args, path: str, **kwargs) -> bool:
        try:
            self.fs.call(method, url, *args, **kwargs)
            return True
        except Exception as e:  # gcsfs raises FileExistsError for 412; older ones an HttpError with code 412
            if isinstance(e, FileExistsError) or getattr(e, "code", None) == 412:
                return False
            raise
        finally:
            self.fs.invalidate_cache(path)


def conditional_writes(fs: fsspec.AbstractFileSystem) -> PlainWrites:
    """The conditional writes `fs` has: one class per kind of store, plain writes for the rest."""
    kinds = protocols(fs)
    if kinds & {"file", "local"}:
        return _LocalWrites(fs)
    if kinds & {"s3", "s3a"}:
        return _S3Writes(fs)
    if kinds & {"gs", "gcs"}:
        return _GCSWrites(fs)
    return PlainWrites(fs)
