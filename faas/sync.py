"""`faas.SyncClient`: the client for scripts and notebooks, without `async`.

```python
from faas import SyncClient

with SyncClient("nats://127.0.0.1:4222") as client:
    print(client.invoke("hello", {"message": "Hi"}).output)
    for chunk in client.stream("hello", {"message": "Hi"}):
        print(chunk.delta, end="", flush=True)
    results = client.map("hello", [{"message": m} for m in ("Hi", "Hello")], concurrency=2)
    job = client.submit("hello", {"message": "Later"})
    print(client.result(job, timeout_s=60).output)
```
It runs a `Client` on an event loop of its own, in a thread of its own, so it works where
another loop already runs (a Jupyter notebook) as well as in a plain script.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from faas.client import Client
from faas.errors import FaasError
from faas.jobs import Job
from faas.protocol import Chunk, Invocation

T = TypeVar("T")
_END = object()


class SyncClient:
    """`Client`'s calls, blocking. Use as a context manager (or call `close()`); the keyword
    options are `Client`'s (a login, an inbox prefix)."""

    def __init__(self, url: str = "nats://127.0.0.1:4222", **connect_options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faas-sync-client", daemon=True)
        self._thread.start()
        self._client = Client(url, **connect_options)
        try:
            self._run(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()  # never to run
            raise FaasError("this SyncClient is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def invoke(self, function: str, event: dict[str, Any] | None = None, **options: Any) -> Invocation:
        """`Client.invoke`, blocking: the reply, or the FaasError of its code."""
        return self._run(self._client.invoke(function, event, **options))

    def map(self, function: str, events: Iterable[dict[str, Any] | None], **options: Any) -> list[Invocation | FaasError]:
        """`Client.map`, blocking: one result per event, in order (an error is returned in
        its place, not raised)."""
        return self._run(self._client.map(function, list(events), **options))

    def submit(self, function: str, event: dict[str, Any] | None = None, **options: Any) -> Job:
        """`Client.submit`, blocking until a node queued the job (at once)."""
        return self._run(self._client.submit(function, event, **options))

    def result(self, job: Job | str, **options: Any) -> Invocation:
        """`Client.result`, blocking: the job's outcome once done (up to `timeout_s`)."""
        return self._run(self._client.result(job, **options))

    def cancel_job(self, job: Job | str) -> bool:
        """`Client.cancel_job`, blocking: True when the job is cancelled, False when it finished first."""
        return self._run(self._client.cancel_job(job))

    def publish(self, subject: str, event: dict[str, Any] | None = None, **options: Any) -> int:
        """`Client.publish`, blocking: the event's stream sequence."""
        return self._run(self._client.publish(subject, event, **options))

    def stream(self, function: str, event: dict[str, Any] | None = None, **options: Any) -> Iterator[Chunk]:
        """`Client.stream`, as an iterator of chunks as they come. Leaving the loop early
        (closing the iterator) cancels the request."""
        chunks: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async with self._client.stream(function, event, **options) as stream:
                    async for chunk in stream:
                        chunks.put(chunk)
            except BaseException as exc:  # handed to the caller's thread, raised there
                chunks.put(exc)
            finally:
                chunks.put(_END)

        task = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := chunks.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not task.done():  # the caller stopped early: the request stops too
                task.cancel()

    def close(self) -> None:
        """Close the connection and the client's loop (idempotent)."""
        if self._thread.is_alive():
            try:
                self._run(self._client.close())
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
