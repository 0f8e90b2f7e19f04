"""What every benchmark here shares: one measured run (a row of its table), and a timed `runner submit`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class Row:
    name: str
    prompts: int
    completion_tokens: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        """Generated tokens per second."""
        return self.completion_tokens / self.seconds if self.seconds else 0.0


def submit(spec: dict, job: Path, out: Path, what: str = "job") -> tuple[float, dict]:
    """Write `spec` to `job`, run `runner submit` on it in a fresh process (its own Ray), and return the
    seconds the whole command took and the manifest it wrote to `out`."""
    job.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "submit", str(job), "--overwrite", "--no-progress",
                           "--no-dashboard"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stdout}\n{proc.stderr}")
    return seconds, json.loads((out / "_manifest.json").read_text())
