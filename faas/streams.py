"""Every JetStream stream, key-value bucket and object store faas creates, in one place:
its subjects, how many copies, how many bytes it may hold, and what goes when it is full.

| name | holds | default | when full |
|---|---|---|---|
| `events` (FAAS_EVENTS) | events, a week each, processed or not (one published before any function listens waits for it) | 1024 MiB | new events are refused: the publisher gets an error (nothing unprocessed is dropped); size it for a week of events |
| `outcomes` (FAAS_OUTCOMES) | dead letters and results | 256 MiB | the oldest go |
| `history` (FAAS_HISTORY) | invocation history | 64 MiB | the oldest go |
| `secrets` (KV faas_secrets) | the functions' secrets (`faas secret set`) | 16 MiB | a `faas secret set` is refused |
| `jobs` (FAAS_JOBS) | async jobs waiting to run (taken ones go), for the jobs' retention at most | 256 MiB | a submit is refused: the producer gets an error |
| `job_results` (KV faas_jobs) | each job's state and outcome, for the jobs' retention (`faas up --job-retention-s`) | 256 MiB | a submit is refused; a finished job's outcome is lost (logged `job_outcome_lost`), its record left as it was |
| `logs` (FAAS_LOGS) | what functions print and log | 512 MiB | the oldest go |
| `functions` (KV faas_functions) | deployed functions and their versions | 64 MiB | a deploy is refused |
| `artifacts` (object store faas_artifacts) | deployed code and adapters | 4096 MiB | a deploy is refused |
| `nodes` (KV faas_nodes) | each node's warm state | 16 MiB | a node's update is refused (peers then see it stale) |

`FAAS_STREAM_MAX_MIB="events=2048,logs=128"` sets other sizes; `FAAS_JS_REPLICAS` the copies
(default 1; 3 on a cluster of three or more servers, so state survives the loss of one).
Both apply when a node or a deploy creates them, and a node brings existing ones to them.
Anyone allowed to publish events can fill `events`; the limit bounds the disk they take.
"""

from __future__ import annotations

import os
from typing import Any

from nats.js.api import DiscardPolicy, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError

from faas import protocol

_MIB = 1 << 20
DEFAULT_MAX_MIB = {"events": 1024, "outcomes": 256, "history": 64, "logs": 512, "functions": 64,
                   "artifacts": 4096, "nodes": 16, "secrets": 16, "jobs": 256, "job_results": 256}
_DISCARD = {"events": DiscardPolicy.NEW, "outcomes": DiscardPolicy.OLD, "history": DiscardPolicy.OLD,
            "logs": DiscardPolicy.OLD, "jobs": DiscardPolicy.NEW}


def js_replicas() -> int:
    """Copies JetStream keeps of each faas stream, bucket and object store:
    `$FAAS_JS_REPLICAS` (default 1). Set when they are first created."""
    try:
        return max(1, min(5, int(os.environ.get("FAAS_JS_REPLICAS", "1"))))
    except ValueError:
        return 1


def max_bytes(name: str) -> int:
    """The bytes `name` may hold: `$FAAS_STREAM_MAX_MIB` (`name=MiB,...`), else the default."""
    sizes = dict(DEFAULT_MAX_MIB)
    for part in os.environ.get("FAAS_STREAM_MAX_MIB", "").split(","):
        key, _, value = part.partition("=")
        if key.strip() in sizes and value.strip().isdigit() and int(value) > 0:
            sizes[key.strip()] = int(value)
    return sizes[name] * _MIB


async def ensure_stream(js: JetStreamContext, name: str, stream: str, subjects: list[str],
                        **config: Any) -> None:
    """Create the stream `stream` (limits of `name`), or bring an existing one to these
    settings."""
    settings = dict(name=stream, subjects=subjects, storage=StorageType.FILE, num_replicas=js_replicas(),
                    max_bytes=max_bytes(name), discard=_DISCARD[name], **config)
    try:
        await js.add_stream(**settings)
    except BadRequestError:  # it exists with other settings: ours win
        await js.update_stream(**settings)


async def key_value(js: JetStreamContext, name: str, bucket: str, **config: Any) -> Any:
    """The KV bucket `bucket` (limits of `name`), created if missing; one created with other
    settings (an older version) keeps them, but takes this size limit."""
    try:
        return await js.create_key_value(bucket=bucket, replicas=js_replicas(), max_bytes=max_bytes(name),
                                         **config)
    except BadRequestError:
        await _resize(js, f"KV_{bucket}", name)
        return await js.key_value(bucket)


async def object_store(js: JetStreamContext) -> Any:
    """The object store of deployed files (limits of `artifacts`), created if missing."""
    bucket = protocol.ARTIFACTS_BUCKET
    try:
        return await js.create_object_store(bucket, replicas=js_replicas(), max_bytes=max_bytes("artifacts"))
    except BadRequestError:
        await _resize(js, f"OBJ_{bucket}", "artifacts")
        return await js.object_store(bucket)


async def _resize(js: JetStreamContext, stream: str, name: str) -> None:
    info = await js.stream_info(stream)
    if info.config.max_bytes != max_bytes(name):
        info.config.max_bytes = max_bytes(name)
        await js.update_stream(info.config)
