"""Event-triggered functions: `tally` publishes what it saw as its result, `picky` fails on a
poison event, `slowpoke` takes longer than the ack wait the event tests give their node."""

import time

from faas import BadRequest, function


@function(name="tally", triggers=["events.tally.>"], results=True, timeout_s=10)
def tally(event: dict, ctx) -> dict:
    info = ctx.event_info
    return {"n": event.get("n"), "run": event.get("run"), "subject": info.subject,
            "sequence": info.sequence,
            "msg_id": info.msg_id, "delivered": info.delivered}


@function(name="picky", triggers=["events.picky"], results=True, max_deliver=3, timeout_s=10)
def picky(event: dict, ctx) -> dict:
    if event.get("poison"):
        raise ValueError(f"cannot digest event {event.get('n')}")
    if event.get("invalid"):  # the event itself is wrong: no retry can help
        raise BadRequest(f"refusing event {event.get('n')}")
    return {"n": event.get("n"), "run": event.get("run"), "delivered": ctx.event_info.delivered}


@function(name="slowpoke", triggers=["events.slow"], results=True, timeout_s=30)
def slowpoke(event: dict, ctx) -> dict:
    time.sleep(float(event.get("s", 0)))
    return {"n": event.get("n"), "run": event.get("run"), "delivered": ctx.event_info.delivered}


@function(name="lastchance", triggers=["events.lastchance"], max_deliver=1, timeout_s=30)
def lastchance(event: dict, ctx) -> dict:
    time.sleep(float(event.get("s", 0)))
    return {"n": event.get("n"), "run": event.get("run")}
