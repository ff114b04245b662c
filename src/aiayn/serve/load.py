"""A small load generator for an aiayn server: N concurrent clients in one asyncio process.

Used by the load test (tests/test_serve_load.py) and the benchmark (benchmarks/serve.py). Each
client sends its next request as soon as its previous one is answered (a closed loop, like N
users of an application), so the server always has up to N requests in flight. While they run,
a probe asks /api/health every ``probe_every`` seconds: its latency shows whether the event loop
stays responsive while batches are being translated. Needs httpx2 (in the serve extra).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Reply:
    status: int
    body: Any  # the JSON answer (None if it was not JSON)
    seconds: float  # from sending the request to reading the whole answer


@dataclass
class LoadResult:
    replies: list[Reply]
    wall_s: float  # from the first request sent to the last answer read
    probe_s: list[float] = field(default_factory=list)  # /api/health latencies during the load

    def summary(self, lines_per_request: Sequence[int] | None = None) -> dict:
        """Latency percentiles (ms) and throughput of the answered requests."""
        seconds = np.array([r.seconds for r in self.replies]) * 1000
        n = len(self.replies)
        lines = sum(lines_per_request) if lines_per_request is not None else n
        probe = np.array(self.probe_s) * 1000
        return {
            "requests": n, "ok": sum(r.status == 200 for r in self.replies),
            "p50_ms": float(np.percentile(seconds, 50)), "p90_ms": float(np.percentile(seconds, 90)),
            "p99_ms": float(np.percentile(seconds, 99)), "max_ms": float(seconds.max()),
            "requests_per_s": n / self.wall_s, "lines_per_s": lines / self.wall_s, "wall_s": self.wall_s,
            "health_probes": len(probe),
            "health_p99_ms": float(np.percentile(probe, 99)) if len(probe) else float("nan"),
        }


async def send_all(url: str, bodies: Sequence[dict], *, clients: int = 16, path: str = "/api/translate",
                   timeout: float = 120.0, probe_every: float | None = 0.05) -> LoadResult:
    """POST every body to ``url + path`` from ``clients`` concurrent clients; replies in order."""
    try:
        import httpx2
    except ImportError as e:
        raise RuntimeError("the load generator needs httpx2: pip install -e '.[serve]'") from e

    replies: list[Reply | None] = [None] * len(bodies)
    work = iter(enumerate(bodies))  # shared: each client takes the next request when it is free
    probe_s: list[float] = []
    limits = httpx2.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx2.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def user() -> None:
            for index, body in work:
                start = time.perf_counter()
                response = await client.post(path, json=body)
                try:
                    answer = response.json()
                except ValueError:
                    answer = None
                replies[index] = Reply(response.status_code, answer, time.perf_counter() - start)

        async def probe() -> None:
            while True:
                start = time.perf_counter()
                await client.get("/api/health")
                probe_s.append(time.perf_counter() - start)
                await asyncio.sleep(probe_every)

        prober = asyncio.create_task(probe()) if probe_every else None
        start = time.perf_counter()
        try:
            await asyncio.gather(*(user() for _ in range(clients)))
        finally:
            wall = time.perf_counter() - start
            if prober is not None:
                prober.cancel()
                try:
                    await prober
                except asyncio.CancelledError:
                    pass
    return LoadResult(replies=replies, wall_s=wall, probe_s=probe_s)
