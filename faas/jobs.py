"""Async jobs: `job = await client.submit(fn, event)` returns at once; `await
client.result(job.id)` later, from any process holding the id.

A job's id is a secret of the producer's (its capability, like a presigned URL): whoever
holds it may read the result, nobody else. What logs, metrics and operators see is its
request id, the first 32 hex digits of the id's SHA-256, which reads nothing. A node takes
the submit (`faas.jobs.submit.<fn>`), queues the job in JetStream and records it in the KV
bucket `faas_jobs` of the nodes' account (producers cannot read it); nodes run queued jobs
as invocations and keep each outcome there for the retention the first node made the
bucket with (`faas up --job-retention-s`). A producer reads its outcome through
`faas.jobs.result` with the id, and cancels it through `faas.jobs.cancel`; an operator's
login reads the bucket by request id (`faas result --request-id REQUEST_ID`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from faas import protocol
from faas.errors import BadRequest, FaasError, FunctionNotFound, error_for_code
from faas.protocol import Invocation

STATES = ("queued", "running", "done")


def request_id_of(job_id: str) -> str:
    """The public id of the job whose (secret) id is `job_id`: what logs and operators see."""
    return hashlib.sha256(job_id.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Job:
    """A submitted job: `id` reads its result (keep it like a password), `request_id` names
    it in logs (`job=`), and each of its runs is the request `<request_id>-<try>` (the
    invocation's logs and `metrics.request_id`)."""

    id: str
    function: str

    @property
    def request_id(self) -> str:
        return request_id_of(self.id)


@dataclass(frozen=True)
class JobRecord:
    """A job as the bucket keeps it: its function, where it stands, when it was submitted
    (Unix time), the node running it, how many times it was taken, and once done its
    outcome (`{"output", "metrics"}` or `{"error": {"code", "message"}}`)."""

    function: str
    state: str
    submitted: float
    node: str | None = None
    attempts: int = 0
    outcome: dict[str, Any] | None = field(default=None, compare=False)

    def pack(self) -> bytes:
        return msgpack.packb({"fn": self.function, "state": self.state, "submitted": self.submitted,
                              "node": self.node, "attempts": self.attempts, "outcome": self.outcome},
                             use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> JobRecord:
        """The record in `data`; ValueError when it is not one (whoever wrote the bucket)."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
            record = cls(function=str(raw["fn"]), state=str(raw["state"]), submitted=float(raw["submitted"]),
                         node=raw.get("node") if isinstance(raw.get("node"), str) else None,
                         attempts=int(raw.get("attempts") or 0), outcome=raw.get("outcome"))
        except Exception as exc:  # any malformed bytes: not a record
            raise ValueError(f"malformed job record: {type(exc).__name__}") from None
        done_right = isinstance(record.outcome, dict) and ("output" in record.outcome or "error" in record.outcome)
        if record.state not in STATES or (record.state == "done") != done_right:
            raise ValueError("malformed job record: its state and outcome disagree")
        return record

    def error(self) -> FaasError | None:
        """A done job's error; None when it has an output, or is not done."""
        error = (self.outcome or {}).get("error")
        if error is None:
            return None
        error = error if isinstance(error, dict) else {}
        try:
            code = int(error.get("code") or 500)
        except (TypeError, ValueError):
            code = 500
        return error_for_code(code, str(error.get("message") or "the job failed"))

    def invocation(self) -> Invocation:
        """A done job's outcome: its Invocation, or the FaasError of its code raised."""
        if (err := self.error()) is not None:
            raise err
        outcome = self.outcome or {}
        metrics = outcome.get("metrics")
        return Invocation(output=outcome["output"], metrics=dict(metrics) if isinstance(metrics, dict) else {})


def queued(function: str) -> JobRecord:
    return JobRecord(function=function, state="queued", submitted=time.time())


async def read(nc: NATS, request_id: str) -> JobRecord:
    """The record of the job `request_id`, from the bucket (a node's or an operator's
    login); FunctionNotFound when there is none (never submitted, or expired)."""
    if not protocol.valid_request_id(request_id):
        raise BadRequest(f"{request_id[:64]!r} is not a job's request id (32 hex digits)")
    try:
        kv = await nc.jetstream().key_value(protocol.JOBS_BUCKET)
        entry = await kv.get(request_id)
    except (BucketNotFoundError, KeyNotFoundError):
        entry = None
    if entry is None or not entry.value:
        raise FunctionNotFound(f"no job {request_id}: never submitted, or its result expired")
    try:
        return JobRecord.unpack(entry.value)
    except ValueError as exc:
        raise FaasError(f"job {request_id}: {exc}") from None
