"""A real multi-node Ray cluster on this machine (`ray start --head` and two `ray start --address` nodes):
one job, two pools pinned to their node types, submitted through the Job Submission API.

The "GPU" node has no GPU: it declares two to Ray, advertises the custom resource gpu_infer, and is the
only node whose Python path holds the vLLM stand-in (tests/standins), so the vllm pool, a replica of
tensor parallel size 2 placed through a placement group of two GPU bundles, can only run there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.cluster.ray_nodes import LocalCluster
from tests.conftest import free_port, slow_echo_job, write_job, write_shard

BIN = Path(sys.executable).parent
STANDINS = Path(__file__).resolve().parents[1] / "standins"
ROWS, UNIT = 960, 8
MAX_TOKENS = 32  # enough work on the llama.cpp pool that the stand-in vLLM replica loads before it runs out


def start_mixed(c: LocalCluster) -> None:
    """The head, a CPU node (cpu_infer) and a "GPU" node (gpu_infer, two GPUs declared, the vLLM stand-in)."""
    c.start_head()
    c.add_node("--num-cpus=1", '--resources={"cpu_infer": 1}')
    c.add_node("--num-cpus=1", "--num-gpus=2", '--resources={"gpu_infer": 1}',
               env={**c.env, "PYTHONPATH": f"{STANDINS}:{c.env.get('PYTHONPATH', '')}",
                    "VLLM_STANDIN_STEP_S": "0.01"})  # slow enough that both pools get units


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        start_mixed(c)
        yield c
    finally:
        c.stop()


def runner(cluster, *args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "runner"), *args, "--address", cluster.address], env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def mixed_job(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("mixed")
    (root / "in").mkdir()
    prompts = [" ".join(f"w{i}x{k}" for k in range(3 + i % 7)) for i in range(ROWS)]
    half = ROWS // 2
    write_shard(root / "in" / "a.parquet", prompts[:half], ids=list(range(half)), row_group_size=64)
    write_shard(root / "in" / "b.parquet", prompts[half:], ids=list(range(half, ROWS)), row_group_size=64)
    path = write_job(root / "job.yaml", f"""
        name: mixed
        input: {{path: {root / 'in'}, id_column: id}}
        output: {{path: {root / 'out'}, target_file_mb: 0}}  # a file a unit: a GPU unit's rows read by name
        sampling: {{max_tokens: {MAX_TOKENS}}}
        unit_rows: {UNIT}
        workers:
          - engine: vllm
            name: gpu
            model: standin/model
            num_cpus: 1
            resources: {{gpu_infer: 1}}
            engine_args: {{max_num_seqs: 4, max_model_len: 64, tensor_parallel_size: 2}}
            unit_rows: {UNIT * 3}
          - engine: llamacpp
            name: cpu
            model: {tiny_model}
            num_cpus: 1
            resources: {{cpu_infer: 1}}
            n_ctx: 128
            parallel: 4
        """)
    return path, root, prompts


def test_one_job_two_pools_each_on_its_node_type(cluster, mixed_job):
    path, root, prompts = mixed_job
    done = runner(cluster, "submit", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    sid = done.stdout.split(" as ", 1)[1].split(";")[0]
    assert sid.startswith("runner-mixed-") and "job mixed succeeded" in done.stdout

    manifest = json.loads((root / "out" / "_manifest.json").read_text())
    node_resources = {n["node_id"]: n["resources_total"] for n in cluster.nodes()}
    for pool, resource in (("gpu", "gpu_infer"), ("cpu", "cpu_infer")):
        workers = manifest["pools"][pool]["workers"]
        assert manifest["pools"][pool]["units"] > 0, f"pool {pool} did no work: {manifest['pools']}"
        nodes = {n for w in workers.values() for n in w["nodes"]}
        assert nodes and all(resource in node_resources[n] for n in nodes), (pool, nodes, node_resources)

    table = pq.read_table(root / "out", columns=["id", "text", "error"]).to_pylist()
    assert sorted(r["id"] for r in table) == list(range(ROWS))  # exactly one row per input row
    assert all(r["error"] is None and r["text"] is not None for r in table)
    gpu_units = {json.loads(p.read_text())["unit_id"] for p in (root / "out" / "_commits").glob("*.json")
                 if json.loads(p.read_text())["pool"] == "gpu"}
    by_id = {r["id"]: r["text"] for r in table}
    first_gpu = sorted(gpu_units)[0]  # the stand-in's rows read back the prompt's first words
    gpu_rows = pq.read_table(root / "out" / f"{first_gpu}.parquet", columns=["id"]).column("id").to_pylist()
    assert all(by_id[i] == " ".join(prompts[i].split()[:MAX_TOKENS]) for i in gpu_rows)

    names = {a["name"] for a in cluster.state("actors")}
    assert {"gpu-0", "cpu-0", "coordinator"} <= names
    groups = [g for g in cluster.state("placement_groups") if g["name"].endswith("-gpu-0")]
    assert len(groups) == 1 and [b["unit_resources"].get("GPU") for b in groups[0]["bundles"]] == [1.0, 1.0]
    assert groups[0]["state"] == "REMOVED"  # released when the job ended

    status = runner(cluster, "status", sid)
    assert status.returncode == 0 and f"submission {sid} (job mixed): SUCCEEDED" in status.stdout
    logs = runner(cluster, "logs", sid)
    assert "job mixed succeeded" in logs.stdout


def test_stop_a_submitted_job_then_resubmit_resumes(cluster, tmp_path):
    path = slow_echo_job(tmp_path, "slow", rows=40, step_s=0.25, num_cpus=1, resources={"cpu_infer": 1})
    started = runner(cluster, "submit", str(path), "--no-wait")
    assert started.returncode == 0, started.stderr
    sid = started.stdout.split(" as ", 1)[1].split(";")[0]
    commits = tmp_path / "out" / "_commits"
    deadline = time.time() + 120
    while len(list(commits.glob("*.json")) if commits.exists() else []) < 3 and time.time() < deadline:
        time.sleep(0.5)
    assert runner(cluster, "stop", sid).returncode == 0
    deadline = time.time() + 60
    while "STOPPED" not in runner(cluster, "status", sid).stdout and time.time() < deadline:
        time.sleep(1)
    assert "STOPPED" in runner(cluster, "status", sid).stdout
    before = len(list(commits.glob("*.json")))
    assert 3 <= before < 40

    again = runner(cluster, "submit", str(path))
    assert again.returncode == 0, again.stdout + again.stderr
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["units_skipped"] >= before and manifest["units_committed"] == 40
    assert pq.read_table(tmp_path / "out").num_rows == 40


def test_remote_errors_are_one_line(cluster, tmp_path):
    missing = runner(cluster, "status", "runner-nope-00000000")
    assert missing.returncode == 9 and missing.stderr.strip() == (
        f"error: runner-nope-00000000: no such job on the Ray cluster at {cluster.address}")
    port = free_port()
    down = subprocess.run([str(BIN / "runner"), "logs", "x", "--address", f"http://127.0.0.1:{port}"],
                          env=cluster.env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 9 and "cannot reach a Ray dashboard" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1 and "Traceback" not in down.stderr
