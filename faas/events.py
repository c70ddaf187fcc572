"""`faas events`: what the event triggers hold in JetStream, for operators.

    faas events                  pending events per function (and their dead letters)
    faas events dlq FN           the dead letters of FN: event, subject, error
    faas events replay FN SEQ    publish dead letter SEQ of FN again on its own subject

It reads the streams the node keeps (`FAAS_EVENTS`, `FAAS_OUTCOMES`) through the JetStream
API, which a producer's login on the embedded server may not use: by default it logs in
with the node's credentials from `$FAAS_HOME/nats/node-credentials` when that file is
readable (a local admin), else connects as given.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import msgpack
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from faas import protocol
from faas.errors import FaasError, SpecError
from faas.schedule import Cron


async def pending(nc: NATS) -> list[dict[str, Any]]:
    """Per function consumer: events waiting, delivered but not acked yet, redelivered, and
    dead letters kept."""
    js = nc.jetstream()
    rows = []
    try:
        consumers = await js.consumers_info(protocol.EVENTS_STREAM)
    except NotFoundError:
        return []
    for info in consumers:
        name = info.name.removeprefix("faas-")
        config = info.config
        triggers = config.filter_subjects or ([config.filter_subject] if config.filter_subject else [])
        rows.append({"function": name, "triggers": triggers, "pending": info.num_pending,
                     "ack_pending": info.num_ack_pending, "redelivered": info.num_redelivered,
                     "dead_letters": len(await dead_letters(nc, name)),
                     "next_run": _next_run(config.description)})
    return sorted(rows, key=lambda row: row["function"])


def _next_run(description: str | None) -> str | None:
    """When a scheduled function runs next (UTC, ISO 8601), from its consumer's description
    (`schedule CRON`, set by the node), or None."""
    if not description or not description.startswith("schedule "):
        return None
    try:
        return Cron.parse(description.removeprefix("schedule ")).next_after(datetime.now(timezone.utc)).isoformat()
    except SpecError:
        return None


async def dead_letters(nc: NATS, function: str) -> list[dict[str, Any]]:
    """The dead letters of `function` kept in the outcomes stream, oldest first (each with
    its own stream sequence as `seq`)."""
    js = nc.jetstream()
    subject = protocol.DLQ_PREFIX + function
    letters = []
    try:
        sub = await js.subscribe(subject, ordered_consumer=True)
    except NotFoundError:
        return []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.3)
            except nats.errors.TimeoutError:
                break
            letter = _letter(msg.data)
            if letter is not None:  # anything else in the stream is skipped
                letter["seq"] = msg.metadata.sequence.stream
                letters.append(letter)
    finally:
        await sub.unsubscribe()
    return letters


def _letter(data: bytes) -> dict[str, Any] | None:
    """A dead letter as nodes write it (runtime/node/events.py), or None for anything else."""
    try:
        letter = msgpack.unpackb(data, raw=False)
    except Exception:  # whatever the bytes are: not a letter
        return None
    if not (isinstance(letter, dict) and isinstance(letter.get("event"), dict)
            and isinstance(letter["event"].get("subject"), str)
            and isinstance(letter.get("error"), dict) and isinstance(letter["error"].get("message"), str)
            and isinstance(letter.get("data"), bytes) and isinstance(letter.get("headers", {}), dict)):
        return None
    return letter


async def replay(nc: NATS, function: str, seq: int) -> int:
    """Publish dead letter `seq` of `function` again on its original subject (a new
    Nats-Msg-Id, so the stream does not drop it as a duplicate); returns the new event's
    stream sequence."""
    for letter in await dead_letters(nc, function):
        if letter["seq"] == seq:
            subject = letter["event"]["subject"]
            if not protocol.valid_event_subject(subject):  # a letter names any subject it likes
                raise FaasError(f"dead letter {seq} of {function!r} names the subject {subject[:100]!r}: "
                                "it is not replayed there")
            if letter.get("truncated"):
                raise FaasError(f"dead letter {seq} of {function!r} kept only the first "
                                f"{len(letter['data'])} of {letter.get('data_bytes')} bytes: it cannot be replayed")
            headers = {str(k): str(v) for k, v in letter.get("headers", {}).items() if k != protocol.HDR_MSG_ID}
            headers[protocol.HDR_MSG_ID] = f"replay-{uuid.uuid4().hex}"
            ack = await nc.jetstream().publish(subject, letter["data"], headers=headers)
            return ack.seq
    raise FaasError(f"no dead letter {seq} of {function!r}")
