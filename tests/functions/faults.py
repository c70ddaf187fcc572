"""Functions that misbehave on purpose: each error path of the node is driven by one."""

import os
import time
import uuid

from faas import function

# Tells sandboxes apart: inside their PID namespace every sandbox is PID 1.
INSTANCE = uuid.uuid4().hex


@function(name="boom", timeout_s=10)
def boom(event: dict, ctx) -> dict:
    raise ValueError(f"bad things: {event.get('why', 'no reason')}")


@function(name="crash", timeout_s=10)
def crash(event: dict, ctx) -> dict:
    if event.get("die"):
        os._exit(3)
    if "exit" in event:
        raise SystemExit(event["exit"])
    return {"instance": INSTANCE, "uid": os.getuid()}


@function(name="sleepy", timeout_s=30, max_queue=1, max_batch=1)
def sleepy(event: dict, ctx) -> dict:
    time.sleep(float(event.get("s", 0)))
    return {"slept_s": event.get("s", 0), "instance": INSTANCE}


@function(name="big", timeout_s=10)
def big(event: dict, ctx) -> dict:
    return {"blob": "x" * int(event.get("n", 10))}


@function(name="unencodable", timeout_s=10)
def unencodable(event: dict, ctx) -> dict:
    return {"a_set": {1, 2, 3}}


def broken_setup(ctx) -> None:
    raise RuntimeError("cannot reach the feature store")


@function(name="unready", timeout_s=10, setup=broken_setup)
def unready(event: dict, ctx) -> dict:
    return {"never": "served"}


@function(name="loud", timeout_s=10)
def loud(event: dict, ctx) -> dict:
    raise ValueError("x" * int(event.get("n", 10)))


@function(name="huge-int", timeout_s=10)
def huge_int(event: dict, ctx) -> dict:
    return {"n": 2**70}


def hang_forever(ctx) -> None:
    time.sleep(3600)


@function(name="stuck-setup", timeout_s=20, start_timeout_s=1.5, setup=hang_forever)
def stuck_setup(event: dict, ctx) -> dict:
    return {"never": "served"}
