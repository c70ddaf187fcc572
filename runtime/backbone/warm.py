"""What the node's backbones and engines have in common: one per model, started once however
many ask at the same time, counted while used, kept warm for `keep_alive_s` after the last
user lets go, then retired."""

from __future__ import annotations

import asyncio
from typing import Generic, Protocol, TypeVar

from faas.logs import get_logger

log = get_logger()


class Kept(Protocol):
    model: str
    users: int
    expiry: asyncio.Task[None] | None

    async def close(self) -> None: ...


T = TypeVar("T", bound=Kept)


class KeptWarm(Generic[T]):
    """A registry of `T`s by model: `acquire` / `release`; subclasses say how one starts
    (`_start`) and what else retiring one lets go of (`_retired`)."""

    kind = "process"  # for the log

    def __init__(self, keep_alive_s: float) -> None:
        self.keep_alive_s = keep_alive_s
        self._live: dict[str, T] = {}
        self._starting: dict[str, asyncio.Task[T]] = {}

    async def _start(self, model: str) -> T:
        raise NotImplementedError

    async def _retired(self, item: T) -> None:
        """Called once an item left the registry, before it is closed."""

    async def acquire(self, model: str) -> T:
        """The one of `model`, started if needed; the caller must `release` it."""
        item = self._live.get(model)
        if item is None:
            task = self._starting.get(model)
            if task is None:
                task = asyncio.create_task(self._started(model), name=f"{self.kind}-{model}")
                self._starting[model] = task
                task.add_done_callback(lambda _t: self._starting.pop(model, None))
            item = await asyncio.shield(task)
        item.users += 1
        if item.expiry is not None:
            item.expiry.cancel()
            item.expiry = None
        return item

    async def _started(self, model: str) -> T:
        item = await self._start(model)
        # Registered here, not by the waiters: it is owned even if they all gave up, and
        # expires like any unused one unless someone acquires it.
        self._live[model] = item
        self._schedule_expiry(item)
        return item

    def is_live(self, item: T) -> bool:
        """Still the one users get (not retired)."""
        return self._live.get(item.model) is item

    def release(self, item: T) -> None:
        item.users -= 1
        if item.users == 0 and self.is_live(item):
            self._schedule_expiry(item)

    def _schedule_expiry(self, item: T) -> None:
        item.expiry = asyncio.create_task(self._expire(item))

    async def _expire(self, item: T) -> None:
        await asyncio.sleep(self.keep_alive_s)
        if item.users == 0 and self.is_live(item):
            log.info(f"{self.kind}_released", model=item.model, idle_s=self.keep_alive_s)
            await self.retire(item)

    async def retire(self, item: T) -> None:
        """Take it out of use now and close it."""
        if self.is_live(item):
            del self._live[item.model]
            await self._retired(item)
        await item.close()

    async def close(self) -> None:
        for task in list(self._starting.values()):
            task.cancel()
        live, self._live = list(self._live.values()), {}
        for item in live:
            if item.expiry is not None:
                item.expiry.cancel()
            await self._retired(item)
        await asyncio.gather(*(item.close() for item in live))
