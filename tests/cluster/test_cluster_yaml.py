"""cluster.yaml: valid for Ray's cluster launcher, and it advertises every custom resource the job files ask for."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_checked(config: dict) -> dict:
    """What `ray up` does to the config before it touches AWS: fill in the provider's defaults, merge the
    setup commands, then validate against ray-schema.json plus Ray's own consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def setup_commands_of(prepared: dict, node_type: str) -> list[str]:
    """The setup commands Ray runs on a node of this type: the head runs setup_commands + head_setup_commands;
    a worker type's own worker_setup_commands replace setup_commands + worker_setup_commands."""
    if node_type == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    return prepared["available_node_types"][node_type].get("worker_setup_commands",
                                                           prepared["worker_setup_commands"])


def advertising(config: dict, resource: str) -> list[str]:
    return [name for name, t in config["available_node_types"].items() if t.get("resources", {}).get(resource, 0) > 0]


def test_ray_validates_cluster_yaml():
    ray_checked(load_cluster())


@pytest.mark.parametrize("breakage", [
    lambda c: c.update(max_workers="many"),
    lambda c: c.update(worker_nodes_typo={}),
    lambda c: c["available_node_types"]["cpu_worker"].update(worker_setup_command=["true"]),
    lambda c: c["available_node_types"]["gpu_worker"].update(resources={"gpu_infer": 0.5}),
    lambda c: c.update(head_node_type="nope"),
], ids=["max_workers-not-int", "unknown-top-level-key", "unknown-node-type-key", "fractional-resource",
        "unknown-head-type"])
def test_ray_rejects_a_broken_copy(breakage):
    config = load_cluster()
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_checked(config)


def test_node_types():
    config = load_cluster()
    prepared = ray_checked(config)
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    assert not set(types[head].get("resources", {})) - {"CPU"}, "the head advertises no inference resources"

    gpu, cpu = advertising(config, "gpu_infer"), advertising(config, "cpu_infer")
    assert gpu and cpu and head not in gpu + cpu
    for name, t in types.items():
        if name != head:
            assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= config["max_workers"], name

    for name in gpu:
        commands = "\n".join(setup_commands_of(prepared, name))
        assert '$HOME/runner[vllm]"' in commands and "[cpu]" not in commands, name
    for name in cpu:
        commands = setup_commands_of(prepared, name)
        assert any("$HOME/runner[cpu]" in c and "-DGGML_NATIVE=OFF" in c for c in commands), name
        assert not any("[vllm]" in c for c in commands), name
    head_commands = "\n".join(setup_commands_of(prepared, head))
    assert 'pip install -e "$HOME/runner"' in head_commands and "boto3" in head_commands
    assert "[cpu]" not in head_commands and "[vllm]" not in head_commands

    assert config["file_mounts"] == {"~/runner": "."}
    assert any("--dashboard-host=0.0.0.0" in c and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
               for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def job_custom_resources() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        job = yaml.safe_load(path.read_text()) or {}
        for pool in job.get("workers") or []:
            for name in (pool.get("resources") or {}):
                if name not in BUILTIN_RESOURCES:
                    found.setdefault(name, set()).add(path.name)
    return found


def test_cluster_advertises_every_resource_the_jobs_ask_for():
    wanted = job_custom_resources()
    assert wanted, "no jobs/*.yaml pool asks for a custom resource"
    config = load_cluster()
    missing = {name: sorted(files) for name, files in wanted.items() if not advertising(config, name)}
    assert not missing, f"custom resources no node type in cluster.yaml advertises: {missing}"
