"""The environment a vLLM replica's engine gets from prepare_process, in Ray workers placed as runner places
replicas: no OMP_NUM_THREADS and, for a replica spanning several GPUs, no empty CUDA_VISIBLE_DEVICES that
only Ray set. Needs no vLLM: prepare_process runs before vLLM is imported.

Run as a script, this file is the driver of that check: it starts a Ray of its own with fake GPUs (Ray
schedules them as any resource; nothing touches a device) and prints what each worker saw as JSON."""

import json
import os
import subprocess
import sys

from runner.engines.vllm import inherited, prepare_process

KEYS = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
# What Ray before 2.5x did by default: give a worker that holds no GPU CUDA_VISIBLE_DEVICES="".
OVERRIDE_ON_ZERO = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}


def test_a_worker_inherits_a_variable_from_its_job_env_else_its_raylet():
    raylet = b"PATH=/bin\0CUDA_VISIBLE_DEVICES=0,1\0OMP_NUM_THREADS_X=9\0"
    assert inherited("CUDA_VISIBLE_DEVICES", {}, raylet) == "0,1"
    assert inherited("CUDA_VISIBLE_DEVICES", {"CUDA_VISIBLE_DEVICES": ""}, raylet) == ""  # the job's wins
    assert inherited("OMP_NUM_THREADS", {}, raylet) is None  # another variable's name is no match
    assert inherited("OMP_NUM_THREADS", {"OMP_NUM_THREADS": 4}, b"") == "4"


def test_outside_a_ray_worker_the_environment_is_left_as_it_is_and_no_ray_starts(monkeypatch):
    import ray

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    connected = ray.is_initialized()  # a driver of the session's Ray, or no Ray at all
    prepare_process(gpus_from_group=True)
    assert {k: os.environ.get(k) for k in KEYS} == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "3"}
    assert ray.is_initialized() == connected  # asking Ray for a context it lacks would have started one


def test_a_tensor_parallel_replica_drops_only_the_empty_cuda_devices_ray_gave_it():
    clean = {k: v for k, v in os.environ.items() if k not in KEYS}  # as a node that sets neither
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, env=clean)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    unset = {"CUDA_VISIBLE_DEVICES": None, "OMP_NUM_THREADS": None}
    # Ray 2.60 as it comes: the actor holding no GPU has no CUDA_VISIBLE_DEVICES; Ray's OMP_NUM_THREADS goes
    assert seen["tp"]["ray"] == {"CUDA_VISIBLE_DEVICES": None, "OMP_NUM_THREADS": "1"}
    assert seen["tp"]["engine"] == unset
    # Ray's old default blanks it; the engine core, our child, gets the node's view back
    assert seen["tp_old_ray"]["ray"]["CUDA_VISIBLE_DEVICES"] == ""
    assert seen["tp_old_ray"]["engine"] == unset
    # An empty value the job's own runtime env sets is the user's: kept, as is their OMP_NUM_THREADS
    assert seen["tp_user"]["engine"] == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "3"}
    # A one-GPU replica holds its GPU: Ray's CUDA_VISIBLE_DEVICES names it and stays
    assert seen["one_gpu"]["ray"]["CUDA_VISIBLE_DEVICES"] == seen["one_gpu"]["engine"]["CUDA_VISIBLE_DEVICES"]
    assert seen["one_gpu"]["engine"]["CUDA_VISIBLE_DEVICES"] in {"0", "1", "2"}


class _Replica:
    """A replica's actor, as far as its environment goes."""

    def probe(self, gpus_from_group: bool) -> dict:
        """The variables as Ray left them, then as a child of this worker (vLLM's engine core) gets them after
        prepare_process, called with the argument VLLMEngine.from_pool gives it."""
        ray_env = {k: os.environ.get(k) for k in KEYS}
        prepare_process(gpus_from_group)
        code = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {KEYS!r}}}))"
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return {"ray": ray_env, "engine": json.loads(child.stdout)}


def _main() -> None:
    """Each case's replica placed with runner.cluster.ray's own options (a multi-GPU one in the first bundle of
    replica_group's placement group, holding no GPU itself), one after another."""
    import ray

    from runner.cluster.placement import replica_group, replica_options
    from runner.spec.pools import VLLMPool

    ray.init(address="local", num_cpus=2, num_gpus=3, include_dashboard=False, logging_level="ERROR")
    tp = VLLMPool(engine="vllm", model="/models/unused", engine_args={"tensor_parallel_size": 2})
    one = VLLMPool(engine="vllm", model="/models/unused")
    group = replica_group(tp)
    ray.get(group.ready(), timeout=60)
    cases = {"tp": (tp, None), "tp_old_ray": (tp, OVERRIDE_ON_ZERO),
             "tp_user": (tp, {**OVERRIDE_ON_ZERO, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "3"}),
             "one_gpu": (one, None)}
    seen = {}
    for name, (pool, env_vars) in cases.items():
        options = replica_options(pool, group if pool.gpus_per_replica > 1 else None)
        actor = ray.remote(_Replica).options(**options, runtime_env={"env_vars": env_vars} if env_vars else None)
        replica = actor.remote()
        seen[name] = ray.get(replica.probe.remote(pool.gpus_per_replica > 1), timeout=120)
        ray.kill(replica)  # its share of the bundle goes to the next case
    ray.shutdown()
    print(json.dumps(seen))


if __name__ == "__main__":
    _main()
