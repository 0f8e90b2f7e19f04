"""Engines behind one protocol; each engine module is imported only where a pool uses it."""

from __future__ import annotations

import importlib
import time

from runner.engines.base import Completion, Engine, Request
from runner.errors import ModelError, first_line
from runner.spec.job import JobSpec
from runner.spec.pools import PoolBase
from runner.spec.sampling import Sampling

WARM_UP_S = 300.0  # the most a warm-up waits for its row; an engine that holds it longer is left to the stall check


def create_engine(pool: PoolBase, spec: JobSpec) -> Engine:
    """Build the pool's engine, named by its config class (this loads the model)."""
    module, cls = pool.builder.split(":")
    return getattr(importlib.import_module(module), cls).from_pool(pool, spec)


def load_error(pool_name: str, pool: PoolBase, e: BaseException, what: str = "cannot load") -> ModelError:
    """A model that cannot load (or run its warm-up decode), said in one line: a ModelError, which retires the
    replica instead of replacing it."""
    model = getattr(pool, "model", None) or pool.engine
    return ModelError(f"pool {pool_name}: {what} {model}: {first_line(e).removeprefix(f'{model}: ')}")


def warm_up(engine: Engine) -> None:
    """One short row through a freshly built engine before it takes units. A model that crashes its engine
    (a native crash ends the process) on every decode then fails its replica at load, as a model that
    cannot load does: no unit is charged an attempt and no row is written failed. The row's own result,
    even an error, is not looked at; an exception is the engine's, and fails the load."""
    engine.add(Request(-1, "Warm up with a short decode.", Sampling(max_tokens=2)))
    deadline = time.monotonic() + WARM_UP_S
    while engine.has_unfinished():
        if time.monotonic() > deadline:
            engine.abort(-1)
            return
        engine.step()


__all__ = ["Completion", "Engine", "Request", "create_engine", "load_error", "warm_up"]
