"""Native crashes of a worker, said in one line: which signal, in which phase, on which CPU, and where the dump is.

A worker's process that dies from a signal leaves Ray only "connection error code 2. End of file". So each
worker points Python's faulthandler (which Ray enables in every worker) at a file of its own in the node's
Ray logs folder: on SIGSEGV, SIGABRT, SIGBUS, SIGILL or SIGFPE it writes "Fatal Python error: <signal name>"
and every thread's stack there, from the signal handler itself. The driver reads that file's first line back
from the worker's node when the worker is lost. Ray's own dump of the crash (its C++ failure handler's
"*** SIGSEGV received ..." and stack addresses) stays in the worker's .err log: the driver's terminal,
which Ray streams worker output to, leaves out what a crashed process printed after the crash began.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import tempfile
from dataclasses import dataclass

from runner.schedule.coordinator import Phase, WorkerInfo
from runner.spec.pools import PoolBase

log = logging.getLogger(__name__)

# faulthandler's names of the signals it handles (CPython Modules/faulthandler.c) -> the signal
SIGNALS = {"Segmentation fault": "SIGSEGV", "Aborted": "SIGABRT", "Bus error": "SIGBUS",
           "Illegal instruction": "SIGILL", "Floating-point exception": "SIGFPE",
           "Floating point exception": "SIGFPE"}
_FATAL = re.compile(r"Fatal Python error: ([A-Za-z -]+)")
# The first line of a crash as a process prints it: Ray's C++ failure handler, or faulthandler on stderr.
_CRASH_STARTS = re.compile(r"\*\*\* SIG[A-Z]+ received at time=|^Fatal Python error: ")
READ_TIMEOUT_S = 10.0


def crash_log_dir() -> str:
    """This node's Ray logs folder (a worker's session's), else the temp folder."""
    try:
        import ray

        node = ray._private.worker.global_worker.node
        path = node.get_logs_dir_path()
        if path and os.path.isdir(path):
            return path
    except Exception:  # not in a Ray worker, or a Ray without that private API
        pass
    return tempfile.gettempdir()


def watch_crashes(name: str) -> tuple[str, object]:
    """Send faulthandler's crash dump of this process to `runner-crash-<name>-<pid>.log` in the node's Ray
    logs; returns the path and the open file (kept open for the process's life: faulthandler writes to its
    descriptor from the signal handler)."""
    path = os.path.join(crash_log_dir(), f"runner-crash-{name}-{os.getpid()}.log")
    f = open(path, "w")
    faulthandler.enable(file=f, all_threads=True)
    return path, f


def unwatch_crashes(path: str, f) -> None:
    """A worker's work is done: faulthandler writes to stderr again, and the crash log goes if it is empty."""
    import sys

    faulthandler.enable(file=sys.stderr, all_threads=True)
    f.close()
    try:
        if os.path.getsize(path) == 0:
            os.remove(path)
    except OSError:
        pass


def signal_in(text: str) -> str | None:
    """The signal a faulthandler dump names (`SIGSEGV`), or None when `text` holds no dump."""
    m = _FATAL.search(text or "")
    if not m:
        return None
    name = m.group(1).strip()
    return next((sig for words, sig in SIGNALS.items() if name.startswith(words)), None)


def read_head(path: str, limit: int = 4096) -> str:
    """The start of a crash log, '' when it is absent or empty."""
    try:
        with open(path, errors="replace") as f:
            return f.read(limit)
    except OSError:
        return ""


def crash_signal(path: str | None, node_id: str | None) -> str | None:
    """The signal that ended a worker whose crash log is `path` on node `node_id`: read here when the
    worker ran on this node, else by a task on its node (None when that node is gone as well)."""
    if not path:
        return None
    import ray

    here = ray.get_runtime_context().get_node_id()
    if node_id is None or node_id == here:
        return signal_in(read_head(path))
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(read_head).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    try:
        return signal_in(ray.get(task.remote(path), timeout=READ_TIMEOUT_S))
    except Exception as e:  # the node went with its worker
        log.debug("cannot read %s on node %s: %s", path, node_id, e)
        return None


@dataclass(frozen=True)
class CrashReport:
    """A worker's native crash: its signal, its phase, and the one line that says it."""

    signal: str
    phase: Phase
    line: str


def crash_report(pool_name: str, pool: PoolBase, identity: str, signal: str, info: WorkerInfo) -> CrashReport:
    """`pool cpu: llama.cpp crashed (SIGSEGV) on its first decode of /models/q4.gguf; CPU: AVX512 AMX_INT8;
    see <crash log>`; a crash while running units names the worker and the unit it held."""
    who = pool.display_name
    if info.phase is Phase.RUNNING:
        held = info.held
        who = f"worker {identity} ({pool.display_name})"
        when = (f"on unit {held[0]}" + (f" (and {len(held) - 1} more it held)" if len(held) > 1 else "")
                if held else "between units")
    else:
        when = info.phase.value
    cpu = f"; CPU: {info.cpu}" if not pool.num_gpus else ""  # a CPU engine's kernels depend on them
    model = getattr(pool, "model", None) or pool.engine
    return CrashReport(signal, info.phase, f"pool {pool_name}: {who} crashed ({signal}) {when} of {model}{cpu}; "
                                           f"see {info.log}")


class CrashDumpFilter:
    """Leaves out of the driver's terminal what a worker process prints once its crash began (Ray's C++
    failure handler and faulthandler write dozens of lines of stack addresses); they stay in its log files.
    `keep(pid, lines)` returns the lines to show."""

    def __init__(self):
        self.crashed: set[tuple[str, int]] = set()  # (node ip, pid) of processes whose crash began

    def keep(self, where: tuple[str, int], lines: list[str]) -> list[str]:
        if where in self.crashed:
            return []
        for i, line in enumerate(lines):
            if _CRASH_STARTS.search(line):
                self.crashed.add(where)
                return lines[:i]
        return lines


RAY_DEATH_NOTICE = "A worker died or was killed while executing a task by an unexpected system error"
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_ray_terminal() -> None:
    """Keep crash dumps and Ray's notices off a run's terminal; they stay in Ray's log files.

    Ray prints worker output and the raylet's notices on the driver through one function,
    `ray._private.worker.print_to_stdstream` (private API: without it nothing is filtered). It is wrapped
    before ray.init binds it: the lines a worker prints once its crash began are dropped (CrashDumpFilter),
    and so is the raylet's notice of a worker that died, which the supervisor's one line replaces. Ray's
    notice that an embedded Ray uses token authentication (it does so whenever RAY_AUTH_MODE is unset) is
    not printed either: the dashboard line already says where the token is.
    """
    logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
    try:
        from ray._private import worker as ray_worker

        original = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        return
    if getattr(original, "crash_dumps", None) is not None:
        return  # wrapped already
    dumps = CrashDumpFilter()

    def print_to_stdstream(data, ignore_prefix):
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and any(RAY_DEATH_NOTICE in line for line in lines):
            return
        lines = dumps.keep((data.get("ip"), data.get("pid")), lines)
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    print_to_stdstream.crash_dumps = dumps
    ray_worker.print_to_stdstream = print_to_stdstream
