"""`aiayn.serve.batching.DynamicBatcher`: concurrent requests share batches, each gets its own
results in order, search settings never mix, a failing request fails alone, and the event loop
keeps running while a batch is computed. No model here: the batch function is plain Python."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from aiayn.errors import UserError
from aiayn.serve.batching import DynamicBatcher


class Recorder:
    """A batch function that upper-cases its items and records every call; 'boom' raises."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, key, items):
        self.calls.append((key, list(items)))
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)  # like a model: blocks its own thread, not the event loop
        if "boom" in items:
            raise RuntimeError("boom in the batch")
        if "bad" in items:
            raise UserError("a bad line")
        return [f"{key}:{item.upper()}" for item in items]


def run(coro_fn, recorder, **kwargs):
    """Run ``coro_fn(batcher)`` inside a fresh event loop with a started batcher."""

    async def main():
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model") as executor:
            batcher = DynamicBatcher(recorder, executor, **kwargs)
            batcher.start()
            try:
                return await asyncio.wait_for(coro_fn(batcher), 30)
            finally:
                await batcher.stop()

    return asyncio.run(main())


def test_concurrent_requests_share_a_batch_and_get_their_own_results():
    recorder = Recorder()

    async def go(batcher):
        requests = [[f"r{i}a", f"r{i}b"] if i % 3 == 0 else [f"r{i}"] for i in range(20)]
        results = await asyncio.gather(*(batcher.submit("k", items) for items in requests))
        return requests, results, batcher.stats

    requests, results, stats = run(go, recorder, max_wait=0.05, max_items=1000)
    for items, result in zip(requests, results):
        assert result == [f"k:{item.upper()}" for item in items]
    # All 20 arrived within the wait: one call of the batch function, in the worker thread.
    assert len(recorder.calls) == 1 and len(recorder.calls[0][1]) == sum(map(len, requests))
    assert recorder.threads == {"model_0"}
    assert stats.requests == 20 and stats.batches == 1 and stats.largest == 27


def test_different_keys_are_never_batched_together():
    recorder = Recorder()

    async def go(batcher):
        keys = [(4, 1), (1, 1), (4, 2), (4, 1), (1, 1)] * 4
        results = await asyncio.gather(*(batcher.submit(key, [f"s{i}"]) for i, key in enumerate(keys)))
        return keys, results

    keys, results = run(go, recorder, max_wait=0.05, max_items=1000)
    assert results == [[f"{key}:S{i}"] for i, key in enumerate(keys)]
    assert sorted(key for key, _ in recorder.calls) == [(1, 1), (4, 1), (4, 2)]  # one call per key


def test_batches_are_capped_at_max_items():
    recorder = Recorder(delay=0.02)

    async def go(batcher):
        return await asyncio.gather(*(batcher.submit("k", [f"x{i}"]) for i in range(10)))

    results = run(go, recorder, max_wait=0.05, max_items=4)
    assert results == [[f"k:X{i}"] for i in range(10)]
    assert [len(items) for _, items in recorder.calls] == [4, 4, 2]


def test_a_failing_request_fails_alone_and_the_batcher_keeps_serving():
    recorder = Recorder()

    async def go(batcher):
        first = await asyncio.gather(batcher.submit("k", ["a"]), batcher.submit("k", ["boom"]),
                                     batcher.submit("k", ["bad"]), batcher.submit("k", ["b", "c"]),
                                     return_exceptions=True)
        after = await batcher.submit("k", ["d"])
        return first, after, batcher.stats

    (a, boom, bad, bc), after, stats = run(go, recorder, max_wait=0.05, max_items=1000)
    assert a == ["k:A"] and bc == ["k:B", "k:C"] and after == ["k:D"]
    assert isinstance(boom, RuntimeError) and "boom" in str(boom)
    assert isinstance(bad, UserError)
    # The whole batch failed once, then each request ran alone.
    assert recorder.calls[0][1] == ["a", "boom", "bad", "b", "c"]
    assert stats.failures == 2 and stats.requests == 3


def test_a_wrong_number_of_results_is_an_error_not_a_misdelivery():
    async def go(batcher):
        return await asyncio.gather(batcher.submit("k", ["a", "b"]), return_exceptions=True)

    (result,) = run(go, lambda key, items: items[:1], max_wait=0.0)
    assert isinstance(result, RuntimeError) and "1 results for 2 items" in str(result)


def test_the_event_loop_keeps_running_while_a_batch_is_computed():
    recorder = Recorder(delay=0.8)

    async def go(batcher):
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        start = time.perf_counter()
        result = await batcher.submit("k", ["slow"])
        elapsed = time.perf_counter() - start
        tick_task.cancel()
        return result, elapsed, ticks

    result, elapsed, ticks = run(go, recorder, max_wait=0.0)
    assert result == ["k:SLOW"] and elapsed >= 0.8
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    # Ticks every 10 ms; a loop blocked by the batch would stall for its whole 0.8 s. The bound
    # leaves room for a busy shared machine.
    assert len(ticks) >= 20 and max(gaps) < 0.4, f"the event loop stalled for {max(gaps):.3f} s"


def test_stop_answers_waiting_requests():
    recorder = Recorder(delay=0.3)

    async def main():
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = DynamicBatcher(recorder, executor, max_wait=0.0)
            batcher.start()
            waiting = asyncio.ensure_future(batcher.submit("k", ["x"]))
            await asyncio.sleep(0.05)  # the batch is running in the worker thread
            await batcher.stop()
            with pytest.raises(RuntimeError, match="shutting down"):
                await waiting
            with pytest.raises(RuntimeError, match="not running"):
                await batcher.submit("k", ["y"])

    asyncio.run(main())


def test_bad_settings_are_refused():
    with ThreadPoolExecutor(max_workers=1) as executor:
        with pytest.raises(ValueError):
            DynamicBatcher(Recorder(), executor, max_items=0)
        with pytest.raises(ValueError):
            DynamicBatcher(Recorder(), executor, max_wait=-1)
