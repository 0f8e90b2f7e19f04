"""The job lock: one driver at a time per output location, kept by a fenced heartbeat.

The lock is a small object that a driver creates only if it is absent and rewrites every heartbeat only if
it is unchanged since the driver read it back (the Location's conditional writes: an exclusive create and
rename on a local disk, If-None-Match / If-Match on S3, a generation match on GCS, a plain write on other
stores and, said once, on an S3-compatible store that refuses conditional requests with HTTP 501). A lock
whose heartbeat stopped stale_s ago, or whose driver ran on this host and is gone, belongs to a dead driver
and is taken over on the version read, so of two drivers taking it over at once one wins. After taking it,
the driver reads it back, on an object store after a pause: on a store without conditional writes (or one
that ignores or refuses them) the last writer wins and the other driver sees it. A local disk needs no
pause, since its kernel lets only one writer's link or rename through.

Each heartbeat reads the lock first. When another run holds it (this driver's heartbeat was late and the
lock was taken over), the lock is lost: `lost` is set, the heartbeat stops, and `check()` raises
JobConflictError, which the driver's supervisor calls about once a second to stop the job.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from runner.errors import JobConflictError, RunnerError, first_line
from runner.storage.location import Location, storage_errors
from runner.storage.names import LOCK

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 60.0
SETTLE_S = 0.5
ABSENT_S = 0.5


def lock_periods(heartbeat_s: float | None = None, stale_s: float | None = None) -> tuple[float, float]:
    """The heartbeat and staleness periods: the arguments, else RUNNER_LOCK_HEARTBEAT_S and
    RUNNER_LOCK_STALE_S from the environment (tests shorten them for real drivers), else 10 s and 60 s."""
    periods = []
    for given, var, default in ((heartbeat_s, "RUNNER_LOCK_HEARTBEAT_S", HEARTBEAT_S),
                                (stale_s, "RUNNER_LOCK_STALE_S", STALE_S)):
        raw = os.environ.get(var, "") if given is None else given
        try:
            periods.append(float(raw) if raw != "" else default)
        except ValueError:
            raise RunnerError(f"{var}={raw!r}: not a number of seconds") from None
    if not 0 < periods[0] < periods[1]:
        raise RunnerError(f"lock periods: the heartbeat ({periods[0]}s, RUNNER_LOCK_HEARTBEAT_S) must be "
                          f"positive and shorter than stale_s ({periods[1]}s, RUNNER_LOCK_STALE_S)")
    return periods[0], periods[1]


class JobLock:
    """Held for a driver's whole run: `with JobLock(loc, name, run_id) as lock: ...`, the loop that supervises
    the job calling `lock.check()` about once a second."""

    def __init__(self, loc: Location, job: str, run_id: str, heartbeat_s: float | None = None,
                 stale_s: float | None = None):
        self.loc, self.job, self.run_id = loc, job, run_id
        self.heartbeat_s, self.stale_s = lock_periods(heartbeat_s, stale_s)
        self.stop = threading.Event()
        self.lost = threading.Event()  # set, after lost_why, once another run holds the lock
        self.lost_why = ""
        self.written = 0.0  # when this run last wrote the lock
        self.thread: threading.Thread | None = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        with storage_errors(f"output.path: {self.loc.url}: cannot lock"):
            held, version = self._read()
            if held is None:
                wrote = self.loc.create(LOCK, self._record())
            else:
                if not self._ours(held):
                    why = self._dead(held)
                    if not why:
                        raise JobConflictError(self._busy(held))
                    log.warning("output.path %s: taking over the lock of run %s (%s)", self.loc.url,
                                held.get("run_id"), why)
                wrote = self.loc.replace_if(LOCK, self._record(), version)
            if wrote and not self.loc.exclusive_writes:
                time.sleep(SETTLE_S)  # for stores without (or ignoring) conditional writes: see the docstring
            held, _ = self._read_back()
            if not self._ours(held):
                raise JobConflictError(self._busy(held))
        self.written = time.time()
        self.thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self.thread.start()

    def check(self) -> None:
        """Raise JobConflictError (exit 6, one line) once another driver holds the lock. Cheap: it reads no
        storage, so a supervisor's loop can call it every second."""
        if self.lost.is_set():
            raise JobConflictError(self.lost_why)

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.lost.is_set():
            return  # the lock is another run's now
        with storage_errors(f"output.path: {self.loc.url}: cannot unlock"):
            held, version = self._read()
            if self._ours(held):
                self.loc.remove_if(LOCK, version)

    def _beat(self) -> None:
        while not self.stop.wait(self.heartbeat_s):
            try:
                self._renew()
            except Exception as e:  # a storage outage: keep trying; once storage is back, the read-back decides
                log.warning("output.path %s: lock heartbeat failed (%s)", self.loc.url, first_line(e, 200))
            if self.lost.is_set():
                return

    def _renew(self) -> None:
        """Read the lock back; rewrite it on the version read while it is this run's, else it is lost."""
        held, version = self._read()
        if held is not None and not self._ours(held):
            return self._lose(held)
        if held is None:  # removed by someone: this run may have it back only by an exclusive create
            wrote = self.loc.create(LOCK, self._record())
        else:
            wrote = self.loc.replace_if(LOCK, self._record(), version)
        if not wrote:  # refused: another driver wrote it since the read
            held, _ = self._read_back()
            if not self._ours(held):
                return self._lose(held)
        self.written = time.time()

    def _lose(self, held: dict | None) -> None:
        ago = time.time() - self.written
        if held is None:
            what = "the lock is gone and could not be re-created"
        else:
            what = f"the lock was taken over by run {held.get('run_id')} (pid {held.get('pid')} on {held.get('host')})"
        when = (f"while this run's heartbeat was late (last written {ago:.0f}s ago)" if ago > self.stale_s
                else f"(this run last wrote it {ago:.0f}s ago)")
        self.lost_why = f"output.path: {self.loc.url}: {what} {when}; this run stops"
        self.lost.set()

    def _record(self) -> bytes:
        return json.dumps({"job": self.job, "run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "heartbeat": time.time()}, indent=2, sort_keys=True).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """The lock as it is now and its version, or (None, None) when there is none."""
        try:
            data, version = self.loc.read_versioned(LOCK)
        except FileNotFoundError:
            return None, None
        return json.loads(data), version

    def _read_back(self) -> tuple[dict | None, str | None]:
        """The lock after a conditional write, read again while it is absent for up to ABSENT_S: a racing
        driver's replace on a local disk takes the name away for a moment (to compare its version, and
        puts it back when it was not the one read), and a driver that read then would take its own lock
        for another's and back off, as would the other."""
        deadline = time.monotonic() + ABSENT_S
        held, version = self._read()
        while held is None and time.monotonic() < deadline:
            time.sleep(0.02)
            held, version = self._read()
        return held, version

    def _ours(self, held: dict | None) -> bool:
        return held is not None and held.get("run_id") == self.run_id

    def _dead(self, held: dict) -> str | None:
        """Why the holder is gone, or None while it may be alive."""
        age = time.time() - float(held.get("heartbeat", 0))
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f}s"
        if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", 0))):
            return f"its driver, pid {held.get('pid')} on this host, is gone"
        return None

    def _busy(self, held: dict | None) -> str:
        if held is None:
            return f"output.path: {self.loc.url}: another driver is taking over its lock at this moment; try again"
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
