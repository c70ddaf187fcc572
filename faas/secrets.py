"""Secrets: values a function declares by name (`@function(secrets=["DB_URL"])`), kept in
NATS and handed only to that function's sandboxes, as environment variables.

They live in the KV bucket `faas_secrets` of the nodes' account: a producer's login cannot
read it (the embedded server's PRODUCERS account, docker/nats/auth.conf's `producer`), an
operator's may write it (`faas secret set|ls|rm`). `ls` names them, never shows a value.
A node reads a function's secrets when it starts a sandbox of it and sends them with that
sandbox's start, so a changed secret reaches the next sandbox; a missing one fails that
start, saying which to set.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError

from faas import protocol, streams
from faas.errors import BadRequest, FunctionNotFound, HandlerError
from faas.record import valid_name

MAX_VALUE_BYTES = 64 << 10


async def _bucket(nc: NATS) -> Any:
    return await streams.key_value(nc.jetstream(), "secrets", protocol.SECRETS_BUCKET, history=1)


async def set_secret(nc: NATS, name: str, value: bytes) -> None:
    """Store (or replace) secret `name`."""
    if not valid_name(name):
        raise BadRequest(f"secret name {name[:64]!r}: upper-case letters, digits and '_', not a digit first")
    if len(value) > MAX_VALUE_BYTES:
        raise BadRequest(f"secret {name} is {len(value)} bytes: at most {MAX_VALUE_BYTES}")
    try:
        value.decode()
    except UnicodeDecodeError:
        raise BadRequest(f"secret {name} is not UTF-8 text (it becomes an environment variable)") from None
    await (await _bucket(nc)).put(name, value)


async def secret_names(nc: NATS) -> list[str]:
    """The names of the secrets set."""
    try:
        return sorted(await (await _bucket(nc)).keys())
    except NoKeysError:
        return []


async def remove_secret(nc: NATS, name: str) -> None:
    kv = await _bucket(nc)
    try:
        await kv.get(name)
    except KeyNotFoundError:
        raise FunctionNotFound(f"no secret named {name[:64]!r}") from None
    await kv.purge(name)


async def secret_values(nc: NATS, names: tuple[str, ...], function: str) -> dict[str, str]:
    """The values of `names`, for a sandbox of `function`; HandlerError naming the first
    that is not set."""
    if not names:
        return {}
    try:
        kv = await nc.jetstream().key_value(protocol.SECRETS_BUCKET)
    except BucketNotFoundError:
        kv = None
    values = {}
    for name in names:
        try:
            entry = await kv.get(name) if kv is not None else None
        except KeyNotFoundError:
            entry = None
        if entry is None or entry.value is None:
            raise HandlerError(f"{function} needs secret {name}, which is not set: "
                               f"faas secret set {name} VALUE")
        values[name] = entry.value.decode()
    return values
