"""A request's work against its deadline and its caller's cancel: whichever comes first."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from faas.errors import Cancelled, DeadlineExceeded, FaasError


async def race(task: asyncio.Future[Any], deadline: float, cancel: asyncio.Event | None,
               function: str, where: str) -> FaasError | None:
    """Wait for `task` until `deadline` (time.monotonic()) or `cancel`; None when it
    finished, else why the request stopped first (the task is left running)."""
    waits: set[asyncio.Future[Any]] = {task}
    stopper = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
    if stopper is not None:
        waits.add(stopper)
    try:
        await asyncio.wait(waits, timeout=max(0.0, deadline - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopper is not None:
            stopper.cancel()
    if task.done():
        return None
    if cancel is not None and cancel.is_set():
        return Cancelled(f"the caller cancelled the request {where}")
    return DeadlineExceeded(f"function {function!r} ran out of budget {where}")


async def bounded(aw: Awaitable[Any], deadline: float, cancel: asyncio.Event | None, function: str,
                  where: str, undo: Callable[[Any], Awaitable[Any]] | None = None) -> Any:
    """`aw`'s result, or the error of the deadline or cancellation that came first (it is
    cancelled then; a result that came with the stop anyway is passed to `undo`)."""
    task = asyncio.ensure_future(aw)
    try:
        stopped = await race(task, deadline, cancel, function, where)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if stopped is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if undo is not None and not task.cancelled() and task.exception() is None:
            await undo(task.result())
        raise stopped
    return task.result()
