"""The node watch (joined, lost at the first sign, draining) and the replicas that fit on nodes, on recorded
ray.nodes() answers; a real raylet's port is probed on the local Ray."""

from __future__ import annotations

import pytest

from runner.cluster.nodes import PROBE_MISSES, NodeWatch, raylet_answers
from runner.cluster.placement import head_node, replicas_that_fit
from runner.spec.job import parse_spec
from tests.conftest import free_port


def node(nid: str, port: int = 1, alive: bool = True, **resources) -> dict:
    return {"NodeID": nid, "Alive": alive, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port,
            "Resources": resources}


class Cluster:
    def __init__(self, *nodes):
        self.nodes, self.down, self.draining = list(nodes), set(), set()

    def watch(self) -> NodeWatch:
        return NodeWatch(lambda: self.nodes, lambda: set(self.draining), lambda _a, port: port not in self.down)


def test_a_node_is_lost_when_ray_says_so_or_its_raylet_stops_answering():
    c = Cluster(node("head", 1, CPU=0.0), node("a", 2, CPU=2.0), node("b", 3, CPU=2.0))
    w = c.watch()
    first = w.poll()
    assert [n["NodeID"] for n in first.nodes] == ["head", "a", "b"] and not first.joined and not first.lost
    c.down.add(2)  # a's raylet stops answering; Ray still says it is alive
    for _ in range(PROBE_MISSES - 1):
        missed = w.poll()
        assert missed.lost == [] and "a" not in [n["NodeID"] for n in missed.nodes]  # no replica goes there
    changes = w.poll()
    assert changes.lost == ["a"] and [n["NodeID"] for n in changes.nodes] == ["head", "b"]
    assert w.poll().lost == []  # said once
    c.nodes[2] = node("b", 3, alive=False, CPU=2.0)  # Ray's own verdict
    assert w.poll().lost == ["b"]


def test_a_node_joining_and_one_draining_are_said_once():
    c = Cluster(node("head", 1))
    w = c.watch()
    w.poll()
    c.nodes.append(node("c", 4, GPU=1.0))
    assert w.poll().joined == ["c"]
    assert w.poll().joined == []
    c.draining.add("c")
    changes = w.poll()
    assert changes.draining == ["c"] and [n["NodeID"] for n in changes.nodes] == ["head"]
    assert w.poll().draining == []


def pool(**keys):
    raw = {"name": "j", "input": {"path": "/in/"}, "output": {"path": "/out/"}, "workers": [keys]}
    return parse_spec(raw, env={})[0].workers[0]


@pytest.mark.parametrize("keys, expected", [
    ({"engine": "echo", "replicas": "auto", "num_cpus": 1}, 2 + 4 + 0),
    ({"engine": "echo", "replicas": "auto", "num_cpus": 1, "resources": {"gpu_infer": 1}}, 2),
    ({"engine": "echo", "replicas": "auto", "num_cpus": 0, "num_gpus": 1}, 8),
    ({"engine": "echo", "replicas": "auto", "num_cpus": 0.5, "accelerator_type": "H100"}, 4),
    ({"engine": "vllm", "model": "org/m", "replicas": "auto", "engine_args": {"tensor_parallel_size": 4}}, 2),
])
def test_the_replicas_that_fit_count_each_node_by_what_one_replica_reserves(keys, expected):
    nodes = [node("gpu", CPU=2.0, GPU=8.0, gpu_infer=4.0, **{"accelerator_type:H100": 1.0}),
             node("cpu", CPU=4.5),
             node("head", CPU=0.0, **{"node:__internal_head__": 1.0})]
    assert replicas_that_fit(pool(**keys), nodes) == expected
    assert head_node(nodes) == "head" and head_node(nodes[:2]) is None


def test_a_live_raylet_answers_and_a_closed_port_does_not(ray_local):
    live = next(n for n in ray_local.nodes() if n["Alive"])
    assert raylet_answers(live["NodeManagerAddress"], live["NodeManagerPort"])
    assert not raylet_answers("127.0.0.1", free_port())


def test_a_node_whose_worker_died_is_probed_at_once_and_lost_on_one_miss():
    c = Cluster(node("head", 1), node("a", 2, CPU=2.0))
    w = c.watch()
    w.poll()
    assert w.answers("a") and w.answers(None)
    c.down.add(2)
    assert not w.answers("a") and not w.answers("a")
    assert w.poll().lost == ["a"] and w.poll().lost == []
