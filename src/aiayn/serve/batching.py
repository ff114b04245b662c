"""Dynamic batching: requests that arrive within a few milliseconds are translated together.

Beam search over a batch of N sentences costs far less than N searches of one (the weights are
read once per step for the whole batch), so a server that translates each request on its own
wastes most of the machine under concurrent load. `DynamicBatcher` collects requests for up to
``max_wait`` seconds after the first one arrives (or until ``max_items`` lines are waiting),
groups them by their search settings (a beam-4 and a greedy request cannot share a search),
runs each group as one call of ``run(key, items)`` in a worker thread, and hands every request
exactly its own results, in order.

The model never runs on the event loop: torch releases the GIL inside its kernels, so while a
batch is searched in the worker thread the loop keeps accepting requests, answering health
checks and collecting the next batch. One worker thread runs everything that touches the model
(translation batches here, attention requests through the same executor): torch already uses
every core inside one call, and a single thread means the model is never used concurrently.

A batch that raises is retried request by request, so one bad request fails alone instead of
taking the others of its batch with it; the collector itself survives any exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass
class _Job:
    key: Hashable
    items: list[Any]
    future: asyncio.Future


@dataclass
class BatchStats:
    """What the batcher has done so far (reported by /api/health, checked by the tests)."""

    requests: int = 0  # requests answered with results
    batches: int = 0  # calls of run() that succeeded
    items: int = 0  # lines translated in those calls
    largest: int = 0  # the most lines in one call
    failures: int = 0  # requests answered with an exception
    keys: dict = field(default_factory=dict)  # key -> number of successful calls

    def as_dict(self) -> dict:
        return {"requests": self.requests, "batches": self.batches, "lines": self.items,
                "largest_batch": self.largest, "failed_requests": self.failures}


class DynamicBatcher:
    """Batches ``submit(key, items)`` calls into ``run(key, all_items)`` calls in ``executor``.

    ``run`` must return one result per item, in order. Create and use the batcher inside one
    running event loop: `start` launches the collector task there, `stop` ends it.
    """

    def __init__(self, run: Callable[[Hashable, list[Any]], Sequence[Any]], executor: Executor, *,
                 max_wait: float = 0.005, max_items: int = 64):
        if max_wait < 0 or max_items < 1:
            raise ValueError(f"need max_wait >= 0 and max_items >= 1 (got {max_wait}, {max_items})")
        self._run, self._executor = run, executor
        self.max_wait, self.max_items = max_wait, max_items
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._waiting = 0  # lines submitted and not yet answered

    @property
    def pending(self) -> int:
        """Lines submitted and not yet answered (queued or being translated)."""
        return self._waiting

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the batcher is already running")
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="aiayn-batcher")

    async def stop(self) -> None:
        """End the collector; requests still queued are answered with an error."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, key: Hashable, items: Sequence[Any]) -> list[Any]:
        """The results of ``run(key, items)``, computed in a batch with other requests."""
        if self._task is None:
            raise RuntimeError("the batcher is not running (start() it inside the event loop)")
        items = list(items)
        if not items:
            return []
        future = asyncio.get_running_loop().create_future()
        self._waiting += len(items)
        try:
            self._queue.put_nowait(_Job(key, items, future))
            return await future
        finally:
            self._waiting -= len(items)

    # -- the collector ---------------------------------------------------------------------------

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            try:
                # The short wait: whoever arrives within max_wait of the first request rides along.
                # Under load the queue already holds the requests that came in while the previous
                # batch ran, and this loop takes them without waiting.
                size, deadline = len(jobs[0].items), loop.time() + self.max_wait
                while size < self.max_items:
                    if self._queue.empty():
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        try:
                            job = await asyncio.wait_for(self._queue.get(), remaining)
                        except asyncio.TimeoutError:
                            break
                    else:
                        job = self._queue.get_nowait()
                    jobs.append(job)
                    size += len(job.items)
                groups: dict[Hashable, list[_Job]] = {}
                for job in jobs:  # dicts keep insertion order: the first-come key runs first
                    groups.setdefault(job.key, []).append(job)
                for key, group in groups.items():
                    await self._run_group(key, group)
            except asyncio.CancelledError:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as e:  # a bug in the batching itself: answer, log, keep serving
                log.exception("aiayn serve: batch collector error")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    async def _run_group(self, key: Hashable, group: list[_Job]) -> None:
        live = [job for job in group if not job.future.done()]  # a cancelled request is skipped
        if not live:
            return
        items = [item for job in live for item in job.items]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, key, items)
            results = list(results)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as e:
            if len(live) > 1:
                # Find the culprit: each request alone, so only a failing one gets the error.
                for job in live:
                    await self._run_group(key, [job])
                return
            if not isinstance(e, UserError):  # a UserError is the request's fault: no traceback
                log.error("aiayn serve: batch of %d line(s) failed", len(items), exc_info=e)
            self.stats.failures += 1
            if not live[0].future.done():
                live[0].future.set_exception(e)
            return
        stats = self.stats
        stats.batches += 1
        stats.items += len(items)
        stats.largest = max(stats.largest, len(items))
        stats.keys[key] = stats.keys.get(key, 0) + 1
        start = 0
        for job in live:
            end = start + len(job.items)
            if not job.future.done():
                stats.requests += 1
                job.future.set_result(results[start:end])
            start = end
