"""The wire protocol: subjects, headers, envelopes and their msgpack / JSON encodings.

Every other module builds subjects and envelopes through this one, so the protocol
is defined in exactly one place (the README documents it for non-Python producers).

Request: a msgpack map or a JSON object on `faas.invoke.<function>` (empty body = `{}`).
Reply:   `{"output": ..., "metrics": {...}}`, or `{"error": {"code", "message"}}` with the
NATS micro error headers. A request sent as JSON (by header or by body) is answered in
JSON, anything else in msgpack.

Longer than most modules: it is the whole wire (subjects, headers, envelopes and the checks
of what a caller sends), in one place that every client and the node share.
"""

from __future__ import annotations

import enum
import hmac
import json
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from faas.errors import BadRequest, FaasError, error_for_code

INVOKE_PREFIX = "faas.invoke."
INVOKE_WILDCARD = INVOKE_PREFIX + "*"
# One queue group shared by every node: each request reaches exactly one node.
NODE_QUEUE_GROUP = "faas-nodes"
# Every node answers this (no queue group) with what it serves; callers gather replies.
ADMIN_LS_SUBJECT = "faas.admin.ls"
# One message per invocation, kept in a JetStream stream so every node, and a restarted
# one, predicts from the same history.
HISTORY_PREFIX = "faas.history."
HISTORY_STREAM = "FAAS_HISTORY"
# Events (JetStream, at least once): a stream over `events.>`; each function's failures end
# as dead letters, and its outputs (when it asks) as results, in a stream of their own.
EVENTS_STREAM = "FAAS_EVENTS"
EVENTS_SUBJECTS = ("events.>",)
OUTCOMES_STREAM = "FAAS_OUTCOMES"
DLQ_PREFIX = "faas.dlq."
RESULTS_PREFIX = "faas.results."
HDR_MSG_ID = "Nats-Msg-Id"
# A message here stops the request of that id wherever it is (queued or generating).
CANCEL_PREFIX = "faas.cancel."
CANCEL_WILDCARD = CANCEL_PREFIX + "*"

# Async jobs (faas/jobs.py): a producer submits on `faas.jobs.submit.<fn>`, reads the outcome
# through `faas.jobs.result` and cancels through `faas.jobs.cancel`, its job's id in
# `Faas-Request-Key`; nodes queue jobs in a stream of their own and keep outcomes in a KV
# bucket, neither of which producers reach, and tell each other on `faas.jobs.cancelled`
# (the request id in `Faas-Request-Id`) to stop a cancelled job's run.
JOBS_SUBMIT_PREFIX = "faas.jobs.submit."
JOBS_SUBMIT_WILDCARD = JOBS_SUBMIT_PREFIX + "*"
JOBS_RESULT_SUBJECT = "faas.jobs.result"
JOBS_CANCEL_SUBJECT = "faas.jobs.cancel"
JOBS_CANCELLED_SUBJECT = "faas.jobs.cancelled"
JOBS_QUEUE_PREFIX = "faas.jobs.queue."
JOBS_STREAM = "FAAS_JOBS"
JOBS_BUCKET = "faas_jobs"
JOBS_CONSUMER = "faas-jobs"
# On a job's submit and result answers: queued, running or done.
HDR_JOB_STATE = "Faas-Job-State"

# Cluster state, all in JetStream: deployed functions (one key per function, its history
# the versions), their code and adapter files (content-addressed), and what each node
# holds warm (short-lived keys its node refreshes).
FUNCTIONS_BUCKET = "faas_functions"
ARTIFACTS_BUCKET = "faas_artifacts"
NODES_BUCKET = "faas_nodes"
SECRETS_BUCKET = "faas_secrets"
# Each node's own subjects: requests forwarded to it by another node, and a liveness ping.
NODE_PREFIX = "faas.node."
# What functions print and log (faas logs), kept a day in a stream.
LOGS_PREFIX = "faas.logs."
LOGS_STREAM = "FAAS_LOGS"
# The NATS micro service every node runs ($SRV.PING/INFO/STATS.faas-node).
SERVICE_NAME = "faas-node"
# Where replies to a node's own requests (JetStream, KV, object store, peers) arrive: a
# prefix no producer may subscribe to (producers' replies use `_INBOX`, or their own).
NODE_INBOX_PREFIX = "_INBOX_faas_node"


HDR_CONTENT_TYPE = "Content-Type"
HDR_REQUEST_ID = "Faas-Request-Id"
HDR_TIMEOUT_MS = "Faas-Timeout-Ms"
# An absolute deadline (Unix time in ms), e.g. forwarded by a gateway; past it: 504.
HDR_DEADLINE_MS = "Faas-Deadline-Ms"
# A request with `Faas-Stream: true` gets chunk messages on its reply subject, then one
# message with `Faas-Final: true` carrying the reply envelope (or the error).
HDR_STREAM = "Faas-Stream"
HDR_FINAL = "Faas-Final"
# On a 503: when trying again has a chance (ms).
HDR_RETRY_AFTER_MS = "Faas-Retry-After-Ms"
# A caller asking `Faas-Ack: true` gets an empty message with `Faas-Ack: <node id>` as soon
# as a node takes its request: it can then tell a slow reply from a dead node (and retry).
HDR_ACK = "Faas-Ack"
# On a caller's second and later attempts of one request (same id): a node still holding
# the request answers it to the retry's reply subject; without it a reused id gets a 400.
HDR_RETRY = "Faas-Retry"
# Set by a node that forwards a request to another: the receiver serves it, never forwards.
HDR_FORWARDED_BY = "Faas-Forwarded-By"
# A secret of the caller's (never echoed): a cancel or a retry of the request acts only when
# it carries the same key, so knowing a request id is not enough to stop or take a request.
HDR_REQUEST_KEY = "Faas-Request-Key"
HDR_ERROR = "Nats-Service-Error"
HDR_ERROR_CODE = "Nats-Service-Error-Code"
JSON_CONTENT_TYPE = "application/json"
MSGPACK_CONTENT_TYPE = "application/msgpack"

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
# Request ids, node ids: one subject token (`faas.cancel.<id>`), short, printable.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_KEY_RE = re.compile(r"^[\x21-\x7e]{16,128}$")
# Every header a node takes from a caller is bounded: all of them together at most this
# many bytes (a reply echoes the id, and a message over the server's max payload, headers
# counted, would make the server close the node's connection).
MAX_REQUEST_HEADER_BYTES = 4096
# NATS header values are single lines; keep error messages readable but bounded, so an
# error reply always fits in a message.
_MAX_HEADER_MESSAGE = 1000
MAX_ERROR_MESSAGE = 4096


class Encoding(enum.Enum):
    """The encoding of a request body, which its reply reuses."""

    JSON = "json"
    MSGPACK = "msgpack"

    @property
    def content_type(self) -> str:
        return JSON_CONTENT_TYPE if self is Encoding.JSON else MSGPACK_CONTENT_TYPE


def valid_function_name(name: str) -> bool:
    """Function names are one NATS subject token: lower-case letters, digits, `_` and `-`."""
    return bool(_NAME_RE.match(name))


def valid_subject(subject: str) -> bool:
    """A NATS subject a consumer may filter on: non-empty dot-separated tokens without
    spaces, `*` a whole token, `>` only as the last token."""
    if not isinstance(subject, str) or not subject:
        return False
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if not token or any(c.isspace() for c in token):
            return False
        if (">" in token and (token != ">" or i != len(tokens) - 1)) or ("*" in token and token != "*"):
            return False
    return True


def valid_node_id(node: str) -> bool:
    """A node id is one subject token (it names the node's own subjects)."""
    return isinstance(node, str) and bool(_TOKEN_RE.match(node))


def valid_request_id(request_id: str) -> bool:
    """A request id is one subject token of at most 64 letters, digits, `-` and `_`."""
    return isinstance(request_id, str) and bool(_TOKEN_RE.match(request_id))


_RESERVED_REPLY_PREFIXES = ("$", "faas.", "events.")


def valid_reply_subject(subject: str) -> bool:
    """Whether a node may publish a reply there: not into NATS's system subjects (JetStream,
    KV, object store, micro), nor faas's own or the events' namespaces."""
    return valid_subject(subject) and "*" not in subject and ">" not in subject \
        and not subject.startswith(_RESERVED_REPLY_PREFIXES)


def valid_event_subject(subject: str) -> bool:
    """Whether an event may be published there (a replayed dead letter names its subject):
    one concrete subject, outside NATS's system subjects and faas's own."""
    return valid_subject(subject) and "*" not in subject and ">" not in subject \
        and not subject.startswith(("$", "faas."))


def node_invoke_subject(node: str, function: str) -> str:
    return f"{NODE_PREFIX}{node}.invoke.{function}"


def node_status_subject(node: str) -> str:
    return f"{NODE_PREFIX}{node}.status"


def node_ping_subject(node: str) -> str:
    return f"{NODE_PREFIX}{node}.ping"


def invoke_subject(function: str) -> str:
    """The subject that invokes `function` by request-reply."""
    return INVOKE_PREFIX + function


def function_from_subject(subject: str) -> str:
    """The function name of an invocation subject (`faas.invoke.<fn>`, a node's own
    `faas.node.<node>.invoke.<fn>`, a job's `faas.jobs.submit.<fn>`): its last token, as
    names hold no dots."""
    return subject.rsplit(".", 1)[-1]


def schedule_subject(function: str) -> str:
    """Where a scheduled function's ticks are published (an event subject it is triggered by)."""
    return f"events.schedule.{function}"


def consumer_name(function: str) -> str:
    """The durable consumer of the events stream that feeds `function` (shared by its nodes)."""
    return f"faas-{function}"


def new_request_id() -> str:
    return uuid.uuid4().hex


def cancel_subject(request_id: str) -> str:
    """Publishing anything here cancels the request `request_id`."""
    return CANCEL_PREFIX + request_id


def wants_stream(headers: dict[str, str] | None) -> bool:
    return (headers or {}).get(HDR_STREAM, "").strip().lower() in ("true", "1", "yes")


def is_final(headers: dict[str, str] | None) -> bool:
    """Whether a message on a streamed request's reply subject is its last one."""
    return (headers or {}).get(HDR_FINAL, "").strip().lower() == "true" or HDR_ERROR_CODE in (headers or {})


def valid_request_key(key: str) -> bool:
    """A request's key, or a job's id: 16-128 printable ASCII characters."""
    return isinstance(key, str) and bool(_KEY_RE.match(key))


def new_request_key() -> str:
    """A caller's secret for one request (`Faas-Request-Key`)."""
    return uuid.uuid4().hex + uuid.uuid4().hex


def same_key(expected: str | None, given: str | None) -> bool:
    """Whether a cancel or retry carries the request's key (none was given: nobody may act)."""
    return expected is not None and given is not None \
        and hmac.compare_digest(expected.encode(), given.encode())  # str: ASCII only


@dataclass(frozen=True)
class RequestHeaders:
    """What a node takes from an invocation's headers, checked once where they come in (every
    header is a caller's, and hostile until checked). Times in ms."""

    request_id: str
    timeout_ms: float | None = None  # the caller's budget, relative
    deadline_ms: float | None = None  # an absolute deadline (Unix time)
    stream: bool = False
    ack: bool = False
    retry: bool = False
    key: str | None = None

    def forwarded(self, node_id: str, now_ms: float) -> dict[str, str]:
        """The headers a peer gets: only what was checked here, marked as forwarded (served
        there, never forwarded again), the budget as an absolute deadline (neither the peer
        nor a fallback here may start it afresh)."""
        # Without either, the function's timeout_s applies; the relay waits a day at most.
        deadline = now_ms + (self.timeout_ms if self.timeout_ms is not None else 86_400_000)
        if self.deadline_ms is not None:
            deadline = min(deadline, self.deadline_ms)
        headers = {HDR_REQUEST_ID: self.request_id, HDR_DEADLINE_MS: str(int(deadline)),
                   HDR_FORWARDED_BY: node_id}
        if self.stream:
            headers[HDR_STREAM] = "true"
        if self.retry:
            headers[HDR_RETRY] = "1"
        if self.key is not None:
            headers[HDR_REQUEST_KEY] = self.key
        return headers


def _header_ms(headers: dict[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number of ms, got {raw[:40]!r}") from None
    if not 0 < value < 1e15:  # also refuses nan and inf
        raise BadRequest(f"{name} must be a positive number of ms, got {raw[:40]!r}")
    return value


def parse_request_headers(headers: dict[str, str] | None) -> RequestHeaders:
    """The checked headers of an invocation. BadRequest when they are too large or a value
    is malformed; the id is then not to be echoed."""
    headers = headers or {}
    size = header_bytes(headers)
    if size > MAX_REQUEST_HEADER_BYTES:
        raise BadRequest(f"the request's headers take {size} bytes: at most "
                         f"{MAX_REQUEST_HEADER_BYTES} are accepted")
    request_id = headers.get(HDR_REQUEST_ID)
    if request_id is None:
        request_id = new_request_id()
    elif not valid_request_id(request_id):
        raise BadRequest(f"{HDR_REQUEST_ID} must be 1-64 letters, digits, '-' or '_'")
    key = headers.get(HDR_REQUEST_KEY)
    if key is not None and not valid_request_key(key):
        raise BadRequest(f"{HDR_REQUEST_KEY} must be 16-128 printable ASCII characters")
    retry = headers.get(HDR_RETRY)
    if retry is not None and not (retry.isascii() and retry.isdigit() and len(retry) <= 3):
        raise BadRequest(f"{HDR_RETRY} must be the attempt's number")
    return RequestHeaders(
        request_id=request_id, timeout_ms=_header_ms(headers, HDR_TIMEOUT_MS),
        deadline_ms=_header_ms(headers, HDR_DEADLINE_MS), stream=wants_stream(headers),
        ack=headers.get(HDR_ACK, "").strip().lower() == "true", retry=retry is not None,
        key=key)


# --- encoding ---------------------------------------------------------------------------

def _is_msgpack_map(data: bytes) -> bool:
    first = data[0]
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def request_encoding(data: bytes, headers: dict[str, str] | None) -> Encoding:
    """The encoding a request uses (and its reply will use).

    JSON when the Content-Type header says so or the body is text; msgpack otherwise
    (also for an empty body). Decided before decoding, so a 400 is sent in kind.
    """
    content_type = (headers or {}).get(HDR_CONTENT_TYPE, "")
    if content_type.split(";")[0].strip().lower() == JSON_CONTENT_TYPE:
        return Encoding.JSON
    if not data or _is_msgpack_map(data):
        return Encoding.MSGPACK
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return Encoding.MSGPACK
    return Encoding.JSON


def decode_event(data: bytes, encoding: Encoding) -> dict[str, Any]:
    """Decode a request body into the event dict, or raise BadRequest."""
    if not data.strip():
        return {}
    try:
        if encoding is Encoding.JSON:
            event = json.loads(data)
            # JSON admits what msgpack (sandbox frames) cannot carry, e.g. ints above 2**64.
            msgpack.packb(event, use_bin_type=True)
        else:
            event = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # any malformed body (bad syntax, deep nesting, unhashable keys)
        raise BadRequest(f"body is not a valid {encoding.value} event: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(event, dict):
        raise BadRequest(f"body must be a {encoding.value} object/map, got {type(event).__name__}")
    return event


def encode(obj: Any, encoding: Encoding) -> bytes:
    """Encode a value; TypeError/ValueError if it cannot be represented in `encoding`."""
    if encoding is Encoding.JSON:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return msgpack.packb(obj, use_bin_type=True)


def decode(data: bytes, headers: dict[str, str] | None) -> Any:
    """Decode a reply body in whichever encoding its Content-Type (or first byte) says."""
    if not data:
        return None
    content_type = (headers or {}).get(HDR_CONTENT_TYPE, "")
    if content_type == JSON_CONTENT_TYPE or (not content_type and data[:1] in (b"{", b"[")):
        return json.loads(data)
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# --- envelopes --------------------------------------------------------------------------

@dataclass
class Metrics:
    """Per-request measurements, all on the node. Times in ms, from receiving the request."""

    request_id: str
    node: str
    queue_ms: float = 0.0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    # What the request found: "loaded" (a warm sandbox), "cold" (it waited for one to
    # start), or a level in between (runtime/sandbox/levels.py).
    level: str | None = None
    batch: int = 0  # how many prompts its first prefill ran with (0: it did not generate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Invocation:
    """What `Client.invoke` returns: the handler's output and the node's metrics."""

    output: Any
    metrics: dict[str, Any]


@dataclass
class Chunk:
    """One piece of a streamed reply: new text and the token ids that produced it."""

    delta: str
    token_ids: list[int]


def _header_safe(message: str) -> str:
    one_line = " ".join(message.split())
    return one_line[:_MAX_HEADER_MESSAGE]


def reply_headers(encoding: Encoding, request_id: str) -> dict[str, str]:
    return {HDR_CONTENT_TYPE: encoding.content_type, HDR_REQUEST_ID: request_id}


def ok_reply(output: Any, metrics: Metrics, encoding: Encoding) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a successful reply (TypeError/ValueError if output won't encode)."""
    body = encode({"output": output, "metrics": metrics.to_dict()}, encoding)
    return body, reply_headers(encoding, metrics.request_id)


def error_reply(err: FaasError, encoding: Encoding, request_id: str) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an error reply: micro error headers + `{"error": {code, message}}`
    (+ `retry_after_ms` and its header when the error says when to try again)."""
    headers = reply_headers(encoding, request_id)
    headers[HDR_ERROR] = _header_safe(err.message) or "error"
    headers[HDR_ERROR_CODE] = str(err.code)
    message = err.message
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE] + f"... ({len(err.message)} characters)"
    error: dict[str, Any] = {"code": err.code, "message": message}
    retry_after_s = getattr(err, "retry_after_s", None)
    if retry_after_s is not None:
        error["retry_after_ms"] = int(retry_after_s * 1000)
        headers[HDR_RETRY_AFTER_MS] = str(error["retry_after_ms"])
    return encode({"error": error}, encoding), headers


def chunk_message(chunk: dict[str, Any], encoding: Encoding, request_id: str) -> tuple[bytes, dict[str, str]]:
    """Body and headers of one streamed chunk: `{"delta": text, "token_ids": [...]}`."""
    return encode(chunk, encoding), reply_headers(encoding, request_id)


def header_bytes(headers: dict[str, str] | None) -> int:
    """Bytes of a message's header block on the wire (0 without headers)."""
    if not headers:
        return 0
    return len("NATS/1.0\r\n\r\n") + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def wire_size(body: bytes, headers: dict[str, str] | None) -> int:
    """Bytes the server counts against its max payload: the body plus the header block."""
    return len(body) + header_bytes(headers)


def parse_reply(data: bytes, headers: dict[str, str] | None) -> Invocation:
    """Turn a reply message into an Invocation, or raise the FaasError its code stands for."""
    headers = headers or {}
    body = decode(data, headers)
    raise_error(body, headers)
    if not isinstance(body, dict) or "output" not in body:
        raise FaasError(f"malformed reply: {body!r:.200}")
    return Invocation(output=body["output"], metrics=body.get("metrics", {}))


def raise_error(body: Any, headers: dict[str, str]) -> None:
    """Raise the FaasError an answer (decoded `body`, `headers`) carries, if it carries one."""
    if HDR_ERROR_CODE in headers or (isinstance(body, dict) and "error" in body):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        code = int(error.get("code") or headers.get(HDR_ERROR_CODE, 500))
        err = error_for_code(code, error.get("message") or headers.get(HDR_ERROR, ""))
        if error.get("retry_after_ms") is not None:
            err.retry_after_s = float(error["retry_after_ms"]) / 1000
        raise err


def history_subject(function: str) -> str:
    return HISTORY_PREFIX + function


def history_record(at: float, node: str) -> bytes:
    """One invocation of a function: when it arrived (Unix time, s) and on which node."""
    return msgpack.packb({"t": at, "node": node})


def parse_history(subject: str, data: bytes) -> tuple[str, float]:
    """(function, arrival time) of a history message; ValueError when malformed."""
    if not subject.startswith(HISTORY_PREFIX):
        raise ValueError(f"not a history subject: {subject!r}")
    try:
        record = msgpack.unpackb(data)
        at = float(record["t"])
    except Exception as exc:  # whatever the bytes are, it is not a record
        raise ValueError(f"malformed history record: {type(exc).__name__}") from None
    if not 0 < at < 1e11:  # also refuses nan and inf, which would break the sorted arrivals
        raise ValueError(f"history record with a time out of range: {at}")
    return subject[len(HISTORY_PREFIX):], at
