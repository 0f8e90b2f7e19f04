"""Where a replica runs: the Ray resources of one, the placement group of a replica spanning several GPUs, and
whether a pool can be placed on the cluster at all."""

from __future__ import annotations

import logging

from runner.errors import JobFailedError
from runner.spec.job import JobSpec
from runner.spec.pools import PoolBase

log = logging.getLogger(__name__)


def accelerator(pool: PoolBase) -> dict[str, float]:
    """The pool's accelerator type as the Ray resource every node of that type advertises."""
    return {f"accelerator_type:{pool.accelerator_type}": 0.001} if pool.accelerator_type else {}


def replica_needs(pool: PoolBase) -> dict[str, float]:
    """The Ray resources one replica of the pool takes."""
    need = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources, **accelerator(pool)}
    return {k: v for k, v in need.items() if v}


def replica_group(pool: PoolBase, name: str | None = None):
    """The placement group of a vLLM replica spanning several GPUs: one {GPU: 1} bundle per GPU, the first
    holding the actor's own CPUs too. The actor holds no GPU itself; vLLM's Ray executor puts one engine
    worker in each bundle."""
    from ray.util.placement_group import placement_group

    bundles = [{"GPU": 1.0, **accelerator(pool)} for _ in range(pool.gpus_per_replica)]
    bundles[0].update({"CPU": pool.num_cpus, **pool.resources})  # the actor's own share
    return placement_group(bundles, strategy="PACK" if pool.spans_nodes else "STRICT_PACK", name=name or "")


def replica_options(pool: PoolBase, group=None) -> dict:
    """Ray options that place one replica: by its resources, or in the first bundle of `group`
    (replica_group's, for a replica spanning several GPUs)."""
    if group is None:
        return {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus,
                "resources": {**pool.resources, **accelerator(pool)} or None}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"num_cpus": pool.num_cpus, "num_gpus": 0, "resources": dict(pool.resources) or None,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def check_fits(spec: JobSpec, embedded: bool) -> None:
    """Say when a pool can never be placed instead of waiting forever. On a cluster joined by address
    the autoscaler may still add the nodes a pool needs, so there it is a warning."""
    import ray

    total = ray.cluster_resources()
    for name, pool in zip(spec.pool_names(), spec.workers, strict=True):
        short = {k: v for k, v in replica_needs(pool).items() if total.get(k, 0) < v}
        if short:
            have = {k: total.get(k, 0) for k in short}
            if embedded:
                raise JobFailedError(f"pool {name}: one replica needs {short} but the Ray cluster has {have}")
            log.warning("pool %s: one replica needs %s and the cluster now has %s; waiting for the autoscaler "
                        "to add such a node", name, short, have)
            continue
        if pool.replicas == "auto":
            continue
        wanted = pool.num_cpus * pool.replicas
        if wanted > total.get("CPU", 0):
            log.warning("pool %s asks for %g CPUs over %d replicas; the cluster has %g, so some replicas wait",
                        name, wanted, pool.replicas, total.get("CPU", 0))


HEAD_RESOURCE = "node:__internal_head__"  # the resource only Ray's head node advertises


def replicas_that_fit(pool: PoolBase, nodes: list[dict]) -> int:
    """How many replicas of the pool the nodes hold by their total resources (`replicas: auto`): on each node,
    the fewest times any resource one replica reserves fits, summed. A replica spanning several GPUs needs them
    on one node."""
    need = replica_needs(pool)
    if pool.gpus_per_replica > 1:
        need["GPU"] = float(pool.gpus_per_replica)
    fit = 0
    for node in nodes:
        have = node.get("Resources", {})
        fit += min(int(have.get(k, 0.0) / v + 1e-9) for k, v in need.items())
    return fit


def head_node(nodes: list[dict]) -> str | None:
    """The head node's id, where the coordinator goes: the node a cluster is least likely to lose."""
    return next((n["NodeID"] for n in nodes if HEAD_RESOURCE in n.get("Resources", {})), None)


def on_node(node_id: str | None) -> dict:
    """Ray options that prefer `node_id` (soft: anywhere when it is gone)."""
    if node_id is None:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True)}
