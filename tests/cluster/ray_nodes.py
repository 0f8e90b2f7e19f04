"""Real multi-node Ray clusters on this machine for the tests: `ray start` processes, one group each."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

BIN = Path(sys.executable).parent


class LocalCluster:
    """Ray nodes as `ray start --block` processes, each the leader of its own process group, so stopping
    the cluster kills exactly these processes and their children (never other Ray instances here)."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit
        self.gcs, self.dash = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dash}"
        # A token of this cluster's own: Ray turns token auth on for `ray start --head` once any token exists.
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []

    def start_node(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"node{len(self.procs)}.log", "w")
        # Ports of its own for every node: some default to fixed numbers (the agent's 52365, the Ray
        # client's 10001), which another Ray on this machine, or the node beside it, may hold.
        ports = [f"--{name}={free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "node-manager-port", "object-manager-port")]
        common = ["--block", "--node-ip-address=127.0.0.1", "--object-store-memory=100000000", "--disable-usage-stats",
                  *ports]
        self.procs.append(subprocess.Popen([str(BIN / "ray"), "start", *common, *args], env=env or self.env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        return self.procs[-1]

    def start_head(self) -> None:
        """The head, with no CPUs of its own: replicas go to the nodes added."""
        self.start_node("--head", f"--port={self.gcs}", f"--dashboard-port={self.dash}", "--dashboard-host=127.0.0.1",
                        "--include-dashboard=true", "--num-cpus=0", f"--temp-dir={self.temp_dir}",
                        f"--ray-client-server-port={free_port()}")
        self.wait_nodes(1)

    def add_node(self, *args: str, env: dict | None = None) -> str:
        """Start a node joining the head and wait for it (one at a time: two nodes starting at once can overrun a
        raylet's start timeout here); returns its node id."""
        before = {n["node_id"] for n in self.nodes()}
        self.start_node(f"--address=127.0.0.1:{self.gcs}", *args, env=env)
        self.wait_nodes(len(before) + 1)
        return next(n["node_id"] for n in self.nodes() if n["node_id"] not in before)

    def kill_node(self, proc: subprocess.Popen) -> None:
        """SIGKILL a node's every process (its raylet, agents and workers), as a spot preemption ends them."""
        import psutil

        everything = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in everything:  # Ray starts some in sessions of their own: by pid, not only by group
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def state(self, what: str) -> list[dict]:
        """Ray's state API (`nodes` or `actors`), asked from a process with this cluster's token, so this
        test process keeps its own Ray settings."""
        code = (f"import json; from ray.util import state; print(json.dumps([vars(x) for x in "
                f"state.list_{what}(address={self.address!r}, limit=1000, detail=True)], default=str))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "state API failed")
        return json.loads(out.stdout)

    def nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline, error = time.time() + timeout, None
        while time.time() < deadline:
            for p in self.procs:
                assert p.poll() is None, f"a ray node exited: {self.logs()}"
            try:
                if len(self.nodes()) >= n:
                    return
            except Exception as e:  # the dashboard is still starting
                error = e
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes not up after {timeout}s ({error}): {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(Path(self.temp_dir).glob("node*.log")))

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:  # killed by its test, or a drained node's Ray ended it
                pass
        deadline = time.time() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever the node left behind in its group
            except ProcessLookupError:
                pass
            p.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
