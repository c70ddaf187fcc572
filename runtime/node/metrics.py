"""A node's Prometheus metrics (`faas up --metrics-port PORT`, standard client library):
requests and errors by code per function, TTFT and latency histograms per function, the
level each request found (cold starts by level), and the memory the node holds."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class NodeMetrics:
    def __init__(self, node: str, held: Callable[[], tuple[int, int]], port: int,
                 host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()
        labels = ["node", "function"]
        self.node = node
        self.requests = Counter("faas_requests", "requests answered, by reply code",
                                [*labels, "code"], registry=self.registry)
        self.found = Counter("faas_requests_found", "answered requests by the level their sandbox "
                             "was at (anything but loaded is a cold start of that depth)",
                             [*labels, "level"], registry=self.registry)
        self.ttft = Histogram("faas_ttft_seconds", "time to first token, from receipt",
                              labels, buckets=_BUCKETS, registry=self.registry)
        self.latency = Histogram("faas_latency_seconds", "time to the reply, from receipt",
                                 labels, buckets=_BUCKETS, registry=self.registry)
        self._memory = Gauge("faas_memory_held_bytes", "what the node's sandboxes and backbones hold",
                             ["node", "kind"], registry=self.registry)
        self._held = held
        self._address = (host, port)
        self._server: Any = None
        self._sampler: asyncio.Task[None] | None = None

    def answered(self, function: str, ttft_ms: float | None, total_ms: float, level: str) -> None:
        self.requests.labels(self.node, function, "200").inc()
        self.found.labels(self.node, function, level).inc()
        self.latency.labels(self.node, function).observe(total_ms / 1000)
        if ttft_ms is not None:
            self.ttft.labels(self.node, function).observe(ttft_ms / 1000)

    def failed(self, function: str, code: int) -> None:
        self.requests.labels(self.node, function, str(code)).inc()

    async def _sample(self, every_s: float) -> None:
        # On the event loop: the pools it reads change there (scrapes come on another thread).
        while True:
            host, device = self._held()
            self._memory.labels(self.node, "host").set(host)
            self._memory.labels(self.node, "device").set(device)
            await asyncio.sleep(every_s)

    def serve(self, every_s: float = 1.0) -> None:
        """/metrics on a thread of the client library's own HTTP server (OSError when the
        port is taken: before the node joins anything)."""
        host, port = self._address
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._sampler = asyncio.create_task(self._sample(every_s), name="metrics")

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()
