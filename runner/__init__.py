"""runner: distributed batch inference over Parquet shards.

The Python API is loaded on first use (module __getattr__), so `import runner`, which the CLI does, stays
cheap: `runner.submit(job)`, `runner.status(job)`, `runner.read(job_or_output)`, `runner.plan(job)`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Exported name -> the module that owns it.
_EXPORTS = {
    **dict.fromkeys(("submit", "status", "read", "plan", "load_job"), "runner.api"),
    **dict.fromkeys(("Manifest", "JobStatus", "PoolStats", "WorkerStats", "RequestCounts"), "runner.output.manifest"),
    "JobSpec": "runner.spec.job",
    **dict.fromkeys(("RunnerError", "SpecError", "InputError", "ModelError", "StorageError", "JobConflictError",
                     "JobFailedError", "EngineError", "ClusterError"), "runner.errors"),
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'runner' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
