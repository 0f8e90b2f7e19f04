"""The continuous-batching loop, written once over the engine protocol: keep the engine full across units."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Protocol

from runner.engines.base import Completion, Engine, Request
from runner.engines.constraints import check
from runner.inputs.rows import row_error
from runner.inputs.units import UnitWork
from runner.spec.sampling import Sampling

log = logging.getLogger(__name__)

END = object()  # the feed has no more units


class Feed(Protocol):
    def get(self, block: bool) -> UnitWork | object | None: ...


class BatchLoop:
    """Pulls units from `feed` whenever the engine has free slots, so no slot idles at a unit boundary."""

    def __init__(self, engine: Engine, feed: Feed, on_unit_done: Callable[[UnitWork], None], sampling: Sampling):
        self.engine, self.feed, self.on_unit_done, self.sampling = engine, feed, on_unit_done, sampling
        self.owners: dict[int, tuple[UnitWork, int]] = {}
        self.ids = itertools.count()
        self.exhausted = False
        self.last_progress = time.monotonic()  # when a step last returned, or the loop was last idle

    def run(self) -> None:
        while True:
            self._top_up()
            if not self.owners:
                self.last_progress = time.monotonic()
                if self.exhausted:
                    return
                continue
            for completion in self.engine.step():
                self._record(completion)
            self.last_progress = time.monotonic()

    def _top_up(self) -> None:
        """Admit whole units while fewer requests than the engine's capacity are in flight."""
        while not self.exhausted and len(self.owners) < self.engine.capacity:
            work = self.feed.get(block=not self.owners)
            if work is None:
                return
            if work is END:
                self.exhausted = True
                return
            self._admit(work)

    def _admit(self, work: UnitWork) -> None:
        work.started_at = time.time()
        rows, owners, add, ids = work.rows, self.owners, self.engine.add, self.ids  # per row: kept local
        samplings = rows.samplings or itertools.repeat(self.sampling)
        for row, (prompt, sampling) in enumerate(zip(rows.prompts, samplings, strict=False)):
            error = (rows.bad and rows.bad.get(row)) or row_error(prompt)
            if error:
                self._settle(work, row, Completion.failed(-1, error))
                continue
            request_id = next(ids)
            owners[request_id] = (work, row)
            add(Request(request_id, None, sampling, messages=prompt) if isinstance(prompt, list)
                else Request(request_id, prompt, sampling))
        if not rows.prompts:  # an empty unit settles no row, so nothing else would finish it
            self.on_unit_done(work)

    def _record(self, completion: Completion) -> None:
        work, row = self.owners.pop(completion.request_id)
        sampling = work.rows.samplings[row] if work.rows.samplings else self.sampling
        self._settle(work, row, check(completion, sampling) if sampling.constrained else completion)

    def _settle(self, work: UnitWork, row: int, completion: Completion) -> None:
        if work.results[row] is not None:
            raise RuntimeError(f"{work.unit.id}: row {row} completed twice")
        work.results[row] = completion
        work.remaining -= 1
        if work.remaining == 0:
            self.on_unit_done(work)
