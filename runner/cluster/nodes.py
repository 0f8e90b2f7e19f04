"""The cluster's nodes as a job sees them: which joined, which are lost, which Ray drains.

A node is lost at the first sign: Ray says so, or its raylet's port refuses or does not answer twice in a
row. Ray's own health check declares a node dead only after about 15 s (five missed checks three seconds
apart); a spot node's units should be running elsewhere long before that.
"""

from __future__ import annotations

import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 0.5
PROBE_MISSES = 2  # failed probes in a row that lose a node
PROBE_THREADS = 32


@dataclass
class NodeChanges:
    """What changed since the last poll, and the nodes that can take replicas now."""

    nodes: list[dict] = field(default_factory=list)  # alive, not lost, not draining
    joined: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    draining: list[str] = field(default_factory=list)


def raylet_answers(address: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a node's raylet accepts a TCP connection: the kernel answers for a live process at once, a
    killed one's port refuses, and a vanished machine does not answer at all."""
    try:
        socket.create_connection((address, port), timeout=timeout).close()
        return True
    except OSError:
        return False


class NodeWatch:
    """Polled by the supervisor about once a second; `list_nodes` (ray.nodes()'s form), `draining_nodes` and
    `probe` are Ray's and the network's, given for tests."""

    def __init__(self, list_nodes=None, draining_nodes=None, probe=raylet_answers):
        self.list_nodes = list_nodes or _ray_nodes
        self.draining_nodes = draining_nodes or _ray_draining
        self.probe = probe
        self.known: set[str] = set()
        self.lost: set[str] = set()
        self.draining: set[str] = set()
        self.misses: dict[str, int] = {}
        self.addresses: dict[str, tuple[str, int]] = {}  # node -> its raylet's address and port
        self.pending_lost: list[str] = []  # lost by `answers`, said by the next poll
        self.pool = ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="probe")
        self.started = False

    def poll(self) -> NodeChanges:
        alive = [n for n in self.list_nodes() if n.get("Alive") and n["NodeID"] not in self.lost]
        ids = {n["NodeID"] for n in alive}
        changes = NodeChanges(lost=self.pending_lost)
        self.pending_lost = []
        self.addresses.update({n["NodeID"]: (n["NodeManagerAddress"], n["NodeManagerPort"]) for n in alive})
        if self.started:
            changes.joined = sorted(ids - self.known)
            changes.lost += sorted(self.known - ids - set(changes.lost))
        answers = self.pool.map(lambda n: self.probe(n["NodeManagerAddress"], n["NodeManagerPort"]), alive)
        for node, answered in zip(alive, answers, strict=True):
            nid = node["NodeID"]
            self.misses[nid] = 0 if answered else self.misses.get(nid, 0) + 1
            if self.misses[nid] >= PROBE_MISSES and self.started:
                changes.lost.append(nid)
        self.lost.update(changes.lost)
        self.known = ids - self.lost
        draining = self.draining_nodes() & self.known
        changes.draining = sorted(draining - self.draining)
        self.draining |= draining
        changes.nodes = [n for n in alive if n["NodeID"] in self.known and n["NodeID"] not in self.draining
                         and not self.misses[n["NodeID"]]]  # one that just missed a probe may be going
        self.started = True
        return changes

    def answers(self, node_id: str | None) -> bool:
        """Probe one node now (a worker on it just died): a node whose raylet does not answer is lost at once,
        and the next poll says so."""
        if node_id is None or node_id in self.lost:
            return node_id is None
        node = self.addresses.get(node_id)
        if node is None or self.probe(*node):
            return True
        self.lost.add(node_id)
        self.pending_lost.append(node_id)
        return False

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _ray_nodes() -> list[dict]:
    import ray

    return ray.nodes()


def _ray_draining() -> set[str]:
    """The nodes Ray is draining (`ray drain-node`, an autoscaler's idle or preemption termination); Ray's
    private API, so a Ray without it drains nothing here (SIGTERM still reaches the workers)."""
    try:
        from ray._private import state

        return set(state.state.get_draining_nodes())
    except Exception as e:
        log.debug("cannot ask Ray for draining nodes: %s", e)
        return set()
