"""Engines behind one protocol; each engine module is imported only where a pool uses it."""

from __future__ import annotations

import importlib

from runner.engines.base import Completion, Engine, Request
from runner.pools import PoolBase
from runner.spec import JobSpec


def create_engine(pool: PoolBase, spec: JobSpec) -> Engine:
    """Build the pool's engine, named by its config class (this loads the model)."""
    module, cls = pool.builder.split(":")
    return getattr(importlib.import_module(module), cls).from_pool(pool, spec)


__all__ = ["Completion", "Engine", "Request", "create_engine"]
