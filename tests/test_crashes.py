"""Native crashes said in one line: the signal from faulthandler's own dump, the phase, the CPU; dumps kept off the
terminal; a model that crashes on every decode fails its pool at load."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq
import pytest
from conftest import slow_echo_job, write_shard
from test_faults import run_until_commits, source_rows

from runner.schedule.coordinator import Phase, WorkerInfo
from runner.spec.job import load_spec, parse_spec
from runner.worker.crashes import CrashDumpFilter, crash_report, signal_in


@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE"])
def test_the_signal_is_read_from_faulthandlers_dump(tmp_path, sig):
    """A real process, its faulthandler writing to a file as a worker's does, killed by the real signal."""
    log = tmp_path / "crash.log"
    code = textwrap.dedent(f"""
        import faulthandler, os, signal
        f = open({str(log)!r}, "w")
        faulthandler.enable(file=f, all_threads=True)
        os.kill(os.getpid(), signal.{sig})
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert done.returncode == -getattr(signal, sig)
    assert signal_in(log.read_text()) == sig


def test_no_dump_no_signal():
    assert signal_in("") is None
    assert signal_in("Traceback (most recent call last):\n  ValueError: x") is None


# What a worker printed as it crashed, as Ray streams it to the driver (seen with Ray 2.60).
CRASH_LINES = [
    "loaded the model in 0.2s",
    "*** SIGSEGV received at time=1796235021 on cpu 0 ***",
    "PC: @     0x7f1104b85ad8  (unknown)  (unknown)",
    "    @     0x7f1104a5a050  (unknown)  (unknown)",
    "[2026-12-02 18:10:21,093 E 9528 9528] logging.cc:474: *** SIGSEGV received at time=1796235021 on cpu 0 ***",
]


def test_what_a_process_prints_once_its_crash_began_is_left_out():
    dumps = CrashDumpFilter()
    assert dumps.keep(("10.0.0.1", 9528), CRASH_LINES) == ["loaded the model in 0.2s"]
    assert dumps.keep(("10.0.0.1", 9528), ["Fatal Python error: Segmentation fault", "Extension modules: x"]) == []
    assert dumps.keep(("10.0.0.2", 9528), ["another node's process"]) == ["another node's process"]
    assert dumps.keep(("10.0.0.1", 77), ["Fatal Python error: Aborted", "Thread 0x1"]) == []


def test_a_crash_report_names_engine_model_phase_cpu_and_log():
    spec, _ = parse_spec({"name": "r", "input": {"path": "/in.parquet"}, "output": {"path": "/out"},
                          "workers": [{"engine": "llamacpp", "model": "/models/q4.gguf", "name": "cpu"},
                                      {"engine": "vllm", "model": "/models/hf", "num_gpus": 1, "name": "gpu"}]},
                         env={})
    cpu, gpu = spec.workers
    first = crash_report("cpu", cpu, "cpu-0", "SIGSEGV",
                         WorkerInfo("n", "/logs/c.log", "AVX2 AVX512 AMX_INT8", Phase.FIRST_DECODE))
    assert first.line == ("pool cpu: llama.cpp crashed (SIGSEGV) on its first decode of /models/q4.gguf; "
                          "CPU: AVX2 AVX512 AMX_INT8; see /logs/c.log")
    loading = crash_report("gpu", gpu, "gpu-1", "SIGABRT", WorkerInfo("n", "/l", "AVX2", Phase.LOADING))
    assert loading.line == "pool gpu: vLLM crashed (SIGABRT) while loading of /models/hf; see /l"  # no CPU: a GPU's
    running = crash_report("cpu", cpu, "cpu-0.2", "SIGSEGV",
                           WorkerInfo("n", "/l", "AVX2", Phase.RUNNING, ("part-1", "part-2")))
    assert running.line.startswith("pool cpu: worker cpu-0.2 (llama.cpp) crashed (SIGSEGV) on unit part-1 "
                                   "(and 1 more it held) of /models/q4.gguf; CPU: AVX2")


def test_a_worker_sent_sigsegv_is_reported_by_its_signal_and_its_units_redone(ray_local, tmp_path, caplog):
    rows = 40
    spec, resolved = load_spec(slow_echo_job(tmp_path, "segv", rows, step_s=0.1, replicas=2, num_cpus=0.5))
    runner, result, victims, _ = run_until_commits(spec, resolved, tmp_path / "out", 4, running=2)
    if len(victims) != 2:
        runner.join(timeout=300)
    assert len(victims) == 2, victims
    with caplog.at_level("ERROR", logger="runner.cluster.ray"):
        os.kill(victims[0], signal.SIGSEGV)  # a real signal, to the process itself
        runner.join(timeout=300)

    assert result["status"] == "succeeded" and result["units_committed"] == rows
    assert source_rows(tmp_path / "out") == list(range(rows))  # nothing lost, nothing twice
    said = [r.getMessage() for r in caplog.records if "crashed" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("pool echo0: worker echo0-")
    assert " (the echo engine) crashed (SIGSEGV) on unit " in said[0]
    log = said[0].split("; see ")[1].split(";")[0]
    assert os.path.exists(log) and "Fatal Python error: Segmentation fault" in open(log).read()
    print(said[0])


def submit(job, tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    """`runner submit` as a user runs it, in a process of its own with an embedded Ray: all it prints."""
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "runner.cli", "submit", str(job), "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    return done, time.time() - started


def test_a_model_that_crashes_on_every_decode_fails_its_pool_at_load_in_one_line(tmp_path):
    """Every row crashes the engine, the warm-up's too: no unit is charged, no row written, exit 4, one line."""
    job = slow_echo_job(tmp_path, "crashes", 8, step_s=0, replicas=2, num_cpus=0.5, engine_args={"crash_on": ""})
    done, seconds = submit(job, tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 4, out
    errors = [line for line in out.splitlines() if "crashed" in line]
    assert len(errors) == 1, out
    assert errors[0].startswith("error: pool echo0: the echo engine crashed (SIGSEGV) on its first decode of echo; "
                                "CPU: "), errors[0]
    for dump in ("logging.cc", "Fatal Python error", "SIGSEGV received", "Extension modules", "(raylet)",
                 "Traceback", "connection error code 2", "authentication"):
        assert dump not in out, (dump, out)
    assert not (tmp_path / "out" / "_commits").exists() or not list((tmp_path / "out" / "_commits").iterdir())
    assert not list((tmp_path / "out").glob("*.parquet"))  # no row written failed
    print(f"{seconds:.1f}s: {errors[0]}")


def test_a_poison_row_crash_names_the_signal_in_its_rows_and_keeps_the_dump_off_the_terminal(tmp_path):
    rows = 12
    prompts = [f"row {i} is fine" for i in range(rows)]
    prompts[5] = "row POISON crashes the engine"
    job = slow_echo_job(tmp_path, "poison-cli", rows, step_s=0.01, prompts=prompts,
                        job={"unit_rows": 4, "max_attempts": 2}, parallel=4, num_cpus=0.5,
                        engine_args={"crash_on": "POISON"})
    done, seconds = submit(job, tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for dump in ("logging.cc", "Fatal Python error", "SIGSEGV received", "(raylet)", "connection error code 2"):
        assert dump not in out, (dump, out)
    crashed = [line for line in out.splitlines() if "crashed (SIGSEGV) on unit" in line]
    assert len(crashed) == 2, out  # one line for each attempt
    table = pq.read_table(tmp_path / "out").to_pylist()
    failed = {r["source_row"]: r["error"] for r in table if r["error"]}
    assert sorted(failed) == [4, 5, 6, 7]
    assert all(e.startswith("unit_failed: after 2 attempts: worker echo0-") and e.endswith("crashed (SIGSEGV)")
               for e in failed.values())
    print(f"{seconds:.1f}s: {crashed[0]}\n{failed[5]}")


def test_the_token_notice_of_an_embedded_ray_stays_off_a_healthy_runs_terminal(tmp_path):
    write_shard(tmp_path / "in.parquet", [f"row {i}" for i in range(4)])
    job = slow_echo_job(tmp_path, "healthy", 4, step_s=0)
    done, _ = submit(job, tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "WARNING" not in out and "authentication" not in out.lower(), out
