"""Watching a running job: `runner submit` on a terminal, the Ray dashboard's REST API, Ray's Prometheus
endpoint. One real job, read from outside while it runs."""

import json
import os
import pty
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

from conftest import slow_echo_job

ROWS = 80


def scrape(url: str) -> dict[str, float]:
    """Prometheus text → {metric{sorted runner tags}: value}, for runner's metrics only."""
    out = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        m = re.match(r"(ray_runner_\w+)\{(.*)\} (\S+)$", line)
        if m:
            tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            key = m.group(1) + "".join(f",{k}={tags[k]}" for k in ("job", "pool") if k in tags)
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def get_json(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    return json.loads(urllib.request.urlopen(request, timeout=5).read())


class Terminal:
    """`runner submit` on a pseudo-terminal, as a user at a shell runs it; everything it prints is kept."""

    def __init__(self, args: list[str], env: dict):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.master, self.text = master, ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.text += chunk.decode(errors="replace")

    def find(self, pattern: str) -> str | None:
        m = re.search(pattern, self.text)
        return m.group(1) if m else None


def test_a_running_job_shows_in_the_dashboard_prometheus_and_a_progress_bar(tmp_path):
    job = slow_echo_job(tmp_path, "watched", ROWS, step_s=0.15, replicas=2, num_cpus=0.5)
    token = uuid.uuid4().hex
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "COLUMNS": "160",
           "RAY_metrics_report_interval_ms": "500"}  # Ray's default is 10 s; a short job needs faster
    term = Terminal([sys.executable, "-m", "runner.cli", "submit", str(job)], env)

    samples, jobs_seen, actors_seen = [], [], []
    dashboard = metrics = None
    deadline = time.time() + 240
    while term.proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
        dashboard = dashboard or term.find(r"Ray dashboard: (http://\S+)")
        metrics = metrics or term.find(r"Ray metrics \(Prometheus\): (http://\S+)")
        try:
            if metrics:
                samples.append(scrape(metrics))
            if dashboard and len(actors_seen) < 2:  # until both workers are up
                jobs_seen = get_json(f"{dashboard}/api/jobs/", token)
                actors = get_json(f"{dashboard}/api/v0/actors?detail=1&limit=1000", token)["data"]["result"]["result"]
                actors_seen = [a for a in actors if a["state"] == "ALIVE" and a["name"].startswith("echo0-")]
        except OSError:
            continue  # the job ended between the check and the request
    assert term.proc.wait(timeout=60) == 0, term.text[-3000:]
    term.reader.join(timeout=5)

    # The dashboard: the job by its name, each worker actor by its pool's name.
    assert dashboard and metrics, term.text[-3000:]
    assert "ray get-auth-token" in term.text
    [mine] = [j for j in jobs_seen if j["metadata"].get("job_name") == "watched"]
    assert mine["status"] == "RUNNING" and mine["type"] == "DRIVER"
    assert sorted(a["name"] for a in actors_seen) == ["echo0-0", "echo0-1"]
    assert {a["repr_name"] for a in actors_seen} == {"Worker(echo0-0)", "Worker(echo0-1)"}

    # Prometheus: the counters move while the job runs, and the queue drains.
    done = [s.get("ray_runner_rows_done_total,job=watched,pool=echo0", 0.0) for s in samples]
    moving = sorted({d for d in done if 0 < d < ROWS})
    assert len(moving) >= 2, done  # seen at two different values before the end
    assert done == sorted(done)  # a counter
    assert max(s.get("ray_runner_generated_tokens_total,job=watched,pool=echo0", 0) for s in samples) > 0
    assert max(s.get("ray_runner_tokens_per_s,job=watched,pool=echo0", 0) for s in samples) > 0
    assert max(s.get("ray_runner_units_in_flight,job=watched", 0) for s in samples) >= 1
    depth = [s["ray_runner_queue_depth,job=watched"] for s in samples if "ray_runner_queue_depth,job=watched" in s]
    assert depth and max(depth) > min(depth), depth
    assert not any("ray_runner_rows_failed_total,job=watched,pool=echo0" in s for s in samples)

    # The progress bar on the terminal: rows done of the total, tokens/s and the time left.
    assert re.search(rf"\d+/{ROWS} rows", term.text) and f"{ROWS}/{ROWS} rows" in term.text
    assert re.search(r"\d+ tok/s", term.text) and re.search(r"\d:\d\d:\d\d", term.text)
    assert f"job watched succeeded: {ROWS} rows ok" in term.text
