"""What every baseline's NATS front door shares with a faas node: the reply envelope and
its metrics, TTFT measured from the front door receiving the request to the first token
(time.monotonic() is system-wide on Linux, so a worker process can stamp the token)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Awaitable, Callable

import nats

from faas import FaasError, protocol
from faas.protocol import Encoding, Metrics


def answer(node: str, received: float, outcome: dict[str, Any] | BaseException
           ) -> tuple[bytes, dict[str, str]]:
    """The reply (body, headers) for a request received at `received`: `outcome` is the
    worker's `{"first_token_at", "tokens", "level"}` or the exception that failed it."""
    request_id = protocol.new_request_id()
    if isinstance(outcome, BaseException):
        err = outcome if isinstance(outcome, FaasError) else FaasError(
            f"{type(outcome).__name__}: {outcome}")
        return protocol.error_reply(err, Encoding.MSGPACK, request_id)
    first = outcome.get("first_token_at")
    metrics = Metrics(request_id=request_id, node=node,
                      ttft_ms=(first - received) * 1000 if first is not None else None,
                      total_ms=(time.monotonic() - received) * 1000,
                      tokens_out=int(outcome["tokens"]), level=outcome.get("level"))
    return protocol.ok_reply({"tokens": metrics.tokens_out}, metrics, Encoding.MSGPACK)


async def open_front_door(url: str, on_request: Callable[[Any], Awaitable[None]]) -> nats.NATS:
    """For a baseline running as its own process: log in to NATS with the credentials the
    bench passes as the first stdin line (`{"user", "password"}`), subscribe to every
    invocation and print `ready` once subscribed."""
    nc = await nats.connect(url, **json.loads(sys.stdin.readline()))
    await nc.subscribe(protocol.INVOKE_WILDCARD, cb=on_request)
    await nc.flush()
    print("ready", flush=True)
    return nc
