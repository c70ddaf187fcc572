"""A setup hook and an async handler: state prepared once per sandbox, kept across requests."""

import asyncio
import os

from faas import function


def prepare(ctx) -> None:
    ctx.state["calls"] = 0
    ctx.state["setup_pid"] = os.getpid()


@function(name="counter", timeout_s=10, setup=prepare)
async def counter(event: dict, ctx) -> dict:
    await asyncio.sleep(0)
    ctx.state["calls"] += 1
    return {"calls": ctx.state["calls"], "setup_pid": ctx.state["setup_pid"], "pid": os.getpid(),
            "request_id": ctx.request_id}
