"""A setup hook and an async handler: state prepared once per sandbox, kept across requests."""

import asyncio
import uuid

from faas import function

INSTANCE = uuid.uuid4().hex


def prepare(ctx) -> None:
    ctx.state["calls"] = 0
    ctx.state["setup_instance"] = INSTANCE


@function(name="counter", timeout_s=10, setup=prepare)
async def counter(event: dict, ctx) -> dict:
    await asyncio.sleep(0)
    ctx.state["calls"] += 1
    print(f"counter call {ctx.state['calls']} for {ctx.request_id}")
    return {"calls": ctx.state["calls"], "setup_instance": ctx.state["setup_instance"],
            "instance": INSTANCE,
            "request_id": ctx.request_id}
