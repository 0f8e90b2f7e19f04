"""The examples, run as a user runs them: in a subprocess, on the tiny model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import runner

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytest.importorskip("llama_cpp")


def test_pipeline_joins_every_review_to_its_output_and_resumes(tmp_path, tiny_model):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    proc = subprocess.run([sys.executable, str(EXAMPLES / "pipeline.py"), "--workdir", str(tmp_path / "work"),
                           "--model", tiny_model, "--rows", "40"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "first submit: 40 rows ok, 0 failed, 4 units run, 0 skipped" in proc.stdout
    assert re.search(r"^second submit: 4 units skipped, 0 run$", proc.stdout, re.M), proc.stdout
    assert "ray data: 40 output rows" in proc.stdout

    final = pq.read_table(tmp_path / "work" / "reviews_with_summaries.parquet").to_pylist()
    raw = pq.read_table(tmp_path / "work" / "reviews.parquet").to_pylist()
    assert [r["review_id"] for r in final] == [r["review_id"] for r in raw] == list(range(40))
    assert all(f["text"] == r["text"] and f["stars"] == r["stars"] for f, r in zip(final, raw, strict=False))
    generated = {r["review_id"]: r["text"] for r in runner.read(str(tmp_path / "work" / "out")).to_table().to_pylist()}
    assert [f["summary"] for f in final] == [generated[i] for i in range(40)]  # joined by id, not by position
    assert all(f["summary"] and f["error"] is None for f in final)
