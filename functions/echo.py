"""A plain function: no model, no sandbox-side torch. Echoes the event back (async handler)."""

from faas import function


@function(name="echo", timeout_s=10, max_queue=256)
async def echo(event: dict, ctx) -> dict:
    return {"echo": event, "keys": sorted(map(str, event))}
