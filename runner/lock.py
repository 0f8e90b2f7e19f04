"""The job lock: one driver at a time per output location, kept alive by a heartbeat.

Object stores have no atomic create, so the lock is a small object that the driver writes, reads back
after a short pause (of two drivers writing at the same moment, the last writer wins and the other
sees it), and then rewrites every HEARTBEAT_S seconds. A lock whose heartbeat stopped STALE_S ago, or
whose driver ran on this host and is gone, belongs to a dead driver and is taken over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from runner.errors import JobConflictError
from runner.storage import Location, storage_errors

log = logging.getLogger(__name__)

LOCK = "_lock.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0
SETTLE_S = 0.5


class JobLock:
    """Held for a driver's whole run: `with JobLock(loc, name, run_id): ...`."""

    def __init__(self, loc: Location, job: str, run_id: str, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S):
        self.loc, self.job, self.run_id = loc, job, run_id
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> "JobLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        with storage_errors(f"output.path: {self.loc.url}: cannot lock"):
            held = self._read()
            if held and held.get("run_id") != self.run_id:
                why = self._dead(held)
                if not why:
                    raise JobConflictError(self._busy(held))
                log.warning("output.path %s: taking over the lock of run %s (%s)", self.loc.url,
                            held.get("run_id"), why)
            self._write()
            time.sleep(SETTLE_S)
            held = self._read()
            if not held or held.get("run_id") != self.run_id:
                raise JobConflictError(self._busy(held or {}))
        self.thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        with storage_errors(f"output.path: {self.loc.url}: cannot unlock"):
            held = self._read()
            if held and held.get("run_id") == self.run_id:
                self.loc.fs.rm_file(self.loc.path(LOCK))

    def _beat(self) -> None:
        while not self.stop.wait(self.heartbeat_s):
            try:
                self._write()
            except Exception as e:  # a storage outage: keep trying; the lock goes stale only after STALE_S
                log.warning("output.path %s: lock heartbeat failed (%s)", self.loc.url, e)

    def _write(self) -> None:
        self.loc.write_json(LOCK, {"job": self.job, "run_id": self.run_id, "host": socket.gethostname(),
                                   "pid": os.getpid(), "heartbeat": time.time()})

    def _read(self) -> dict | None:
        try:
            return self.loc.read_json(LOCK)
        except FileNotFoundError:
            return None

    def _dead(self, held: dict) -> str | None:
        """Why the holder is gone, or None while it may be alive."""
        age = time.time() - float(held.get("heartbeat", 0))
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f}s"
        if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", 0))):
            return f"its driver, pid {held.get('pid')} on this host, is gone"
        return None

    def _busy(self, held: dict) -> str:
        age = time.time() - float(held.get("heartbeat", 0))
        return (f"output.path: {self.loc.url} is in use by run {held.get('run_id')} of job {held.get('job')!r} "
                f"(pid {held.get('pid')} on {held.get('host')}, heartbeat {age:.0f}s ago); wait for it to end, "
                f"or it is taken over once its heartbeat is {self.stale_s:.0f}s old")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
