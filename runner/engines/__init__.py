"""Engine registry: each engine module is imported only when a pool uses it."""

from __future__ import annotations

import importlib

from runner.engines.base import Completion, Engine, Request
from runner.spec import JobSpec, WorkerPool

ENGINES = {
    "llamacpp": "runner.engines.llamacpp:LlamaCppEngine",
    "vllm": "runner.engines.vllm:VLLMEngine",
    "echo": "runner.engines.echo:EchoEngine",
}


def create_engine(pool: WorkerPool, spec: JobSpec) -> Engine:
    """Build the pool's engine (this loads the model)."""
    module, cls = ENGINES[pool.engine].split(":")
    return getattr(importlib.import_module(module), cls).from_pool(pool, spec)


__all__ = ["Completion", "Engine", "Request", "create_engine", "ENGINES"]
