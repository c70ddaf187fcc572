"""`faas.Client`: what producers use to call functions over NATS.

```python
async with Client("nats://127.0.0.1:4222") as client:
    result = await client.invoke("support", {"message": "Where is my order?"}, timeout_s=30)
    print(result.output, result.metrics["ttft_ms"])

    async with client.stream("support", {"message": "Where is my order?"}) as stream:
        async for chunk in stream:          # text as it is generated
            print(chunk.delta, end="", flush=True)
    print(stream.result.output)             # then the usual reply
```
Async jobs: `job = await client.submit("support", event)` returns at once; `await
client.result(job.id, timeout_s=600)` waits for its outcome, in this process or in any other
given `job.id` (faas/jobs.py).

Errors raise the FaasError subclass of the reply's code (BadRequest, FunctionNotFound,
HandlerError, Overloaded, DeadlineExceeded).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from faas import protocol
from faas.auth import servers
from faas.connection import connect, raise_if_cancelled
from faas.errors import BadRequest, DeadlineExceeded, FaasError, Overloaded, PayloadTooLarge
from faas.jobs import Job, request_id_of
from faas.logs import get_logger
from faas.protocol import Chunk, Encoding, Invocation

# The node answers 504 when the budget runs out; wait a little longer for that reply.
_REPLY_GRACE_S = 2.0
# A node acknowledges a request as it takes it; none within this long: it died holding it.
_ACK_WAIT_S = 3.0
# nats-py retries a dead server 60 times, 2 s apart, before failing; a producer wants to know
# within seconds. Any of these can be overridden through Client(url, **options).
_CONNECT_DEFAULTS: dict[str, Any] = {"connect_timeout": 2, "reconnect_time_wait": 0.5,
                                     "max_reconnect_attempts": 10}
# A node answers a job's submit, or a question about it, at once (a KV read or write).
_JOB_ANSWER_S = 5.0
_JOB_TRIES = 3


class Client:
    """A NATS connection plus the faas protocol. Use as an async context manager."""

    def __init__(self, url: str = "nats://127.0.0.1:4222", **connect_options: Any) -> None:
        self.url = url
        self._connect_options = {"error_cb": self._on_error, **_CONNECT_DEFAULTS, **connect_options}
        self._nc: NATS | None = None
        self._borrowed = False  # the connection is someone else's to close
        self._first_error: Exception | None = None  # what a failed connect reports
        # The secret of each request in flight from here: only it cancels or retries one.
        self._keys: dict[str, str] = {}
        # Functions whose responders acknowledged a request from here: faas nodes. Only for
        # them does a missing acknowledgement mean a lost request; any other responder may
        # be alive and slow, and a copy would run twice.
        self._acknowledging: set[str] = set()

    async def _on_error(self, exc: Exception) -> None:
        self._first_error = self._first_error or exc
        get_logger().warning("nats_error", error=f"{type(exc).__name__}: {exc}")

    async def connect(self) -> None:
        try:
            self._nc = await connect(servers(self.url), **self._connect_options)
        except (nats.errors.Error, OSError) as exc:
            # nats-py ends with "no servers available"; the cause (a refused login) came first.
            cause = f" ({self._first_error})" if self._first_error and self._first_error is not exc else ""
            raise Overloaded(f"cannot connect to NATS at {self.url}: {exc}{cause}") from None

    @classmethod
    def over(cls, nc: NATS) -> Client:
        """A client on a connection made elsewhere (a node runs jobs through one, as any
        caller would); `close()` leaves that connection open."""
        client = cls()
        client._nc, client._borrowed = nc, True
        return client

    async def close(self) -> None:
        if self._nc is not None and not self._borrowed:
            await self._nc.drain()
        self._nc = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise FaasError("client is not connected: use `async with Client(...)` or connect()")
        return self._nc

    async def invoke(self, function: str, event: dict[str, Any] | None = None, *,
                     timeout_s: float = 60.0, request_id: str | None = None,
                     retries: int = 2) -> Invocation:
        """Call `function` with `event` and wait for its reply (at most `timeout_s`, which
        is also the budget the node enforces).

        The node that takes the request says so at once (`Faas-Ack`); while the reply is
        pending the client checks that node is alive, and if it died (no responder, or
        three pings of 1 s unanswered), or no node acknowledged the request within
        `_ACK_WAIT_S` although this function's nodes acknowledged earlier requests from this
        client (its node died holding it unread), sends it again, with the same id and the
        budget left, up to `retries` times: a handler may then run more than once (a node
        still holding the request ignores the copy). A responder that never acknowledges (not
        a faas node) gets each request once, and the caller waits for it until `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        request_id = request_id or protocol.new_request_id()
        body = _encode(event)
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        key = self._hold(request_id)
        try:
            for attempt in range(retries + 1):
                left = deadline - loop.time()
                if left <= 0:
                    break
                headers = {**_request_headers(left, request_id, key), protocol.HDR_ACK: "true",
                           **({protocol.HDR_RETRY: str(attempt)} if attempt else {})}
                await self._send(protocol.invoke_subject(function), body, inbox, headers)
                reply = await self._await_reply(sub, deadline + _REPLY_GRACE_S, function)
                if reply is not None:
                    return protocol.parse_reply(reply.data, reply.headers)
                get_logger().warning("node_lost_retrying", fn=function, req=request_id, attempt=attempt + 1)
        except asyncio.CancelledError:  # the caller gave up: so does the node
            with contextlib.suppress(nats.errors.Error):
                await self.cancel(request_id)
            raise
        finally:
            self._keys.pop(request_id, None)
            await sub.unsubscribe()
        raise DeadlineExceeded(f"no reply from {function!r} within {timeout_s}s")

    async def map(self, function: str, events: Iterable[dict[str, Any] | None], *,
                  concurrency: int = 8, timeout_s: float = 60.0) -> list[Invocation | FaasError]:
        """Call `function` once per event, at most `concurrency` at a time, and return the
        results in the events' order: each an `Invocation`, or the `FaasError` its call
        raised (one failing event does not stop the others; `timeout_s` is each call's)."""
        if not (isinstance(concurrency, int) and concurrency >= 1):
            raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
        slots = asyncio.Semaphore(concurrency)

        async def one(event: dict[str, Any] | None) -> Invocation | FaasError:
            async with slots:
                try:
                    return await self.invoke(function, event, timeout_s=timeout_s)
                except FaasError as err:
                    return err

        return list(await asyncio.gather(*(one(event) for event in events)))

    async def submit(self, function: str, event: dict[str, Any] | None = None, *,
                     timeout_s: float | None = None, job_id: str | None = None) -> Job:
        """Queue a call of `function` with `event` and return at once with its `Job`; a node
        runs it (at least once) and keeps its outcome for `result`. `timeout_s`: its budget
        once it runs (its function's `timeout_s` caps it; default an hour). `job_id`: an id
        of yours (16-128 printable characters, secret: it reads the result), so a submit sent
        again (a retry after a lost answer) queues one job."""
        if not protocol.valid_function_name(function):
            raise BadRequest(f"{function[:64]!r} is not a function name")
        job_id = job_id or protocol.new_request_key()
        if not protocol.valid_request_key(job_id):
            raise ValueError("a job id is 16-128 printable ASCII characters")
        headers = {protocol.HDR_CONTENT_TYPE: Encoding.MSGPACK.content_type, protocol.HDR_REQUEST_KEY: job_id}
        if timeout_s is not None:
            headers[protocol.HDR_TIMEOUT_MS] = str(int(_positive(timeout_s) * 1000))
        await self._job_request(protocol.JOBS_SUBMIT_PREFIX + function, _encode(event), headers)
        return Job(id=job_id, function=function)

    async def cancel_job(self, job: Job | str) -> bool:
        """Cancel a submitted job: one still queued never runs, a running one has its
        invocation cancelled (as `invoke`'s caller cancelling it: its generation stops), and
        its result is then `Cancelled` (499). True when it is cancelled (by this call or an
        earlier one), False when it finished first (its outcome stays); FunctionNotFound when
        no job of that id is kept."""
        job_id = job.id if isinstance(job, Job) else job
        if not protocol.valid_request_key(job_id):
            raise BadRequest("a job id is 16-128 printable ASCII characters")
        answer = await self._job_request(protocol.JOBS_CANCEL_SUBJECT, b"", {protocol.HDR_REQUEST_KEY: job_id})
        return isinstance(answer, dict) and answer.get("cancelled") is True

    async def _job_request(self, subject: str, body: bytes, headers: dict[str, str]) -> Any:
        """A node's answer to a submit or a cancel. One unanswered, or answered 503, may
        have been done all the same (a slow JetStream): it is sent again with its id (both
        are done once per id)."""
        for _ in range(_JOB_TRIES):
            try:
                reply = await self.nc.request(subject, body, headers=headers, timeout=_JOB_ANSWER_S)
            except nats.errors.MaxPayloadError:
                raise self._too_large("job", body, headers) from None
            except nats.errors.NoRespondersError:
                failure = Overloaded(f"no faas node takes jobs: nothing subscribes to {subject}")
                continue
            except nats.errors.TimeoutError:
                failure = Overloaded(f"no node answered within {_JOB_ANSWER_S:g}s")
                continue
            answer = protocol.decode(reply.data, reply.headers)
            try:
                protocol.raise_error(answer, reply.headers or {})
            except Overloaded as err:
                failure = err
                continue
            return answer
        raise failure

    async def result(self, job: Job | str, *, timeout_s: float = 60.0) -> Invocation:
        """The outcome of a submitted job (a `Job`, or its id, e.g. handed over by another
        process): its Invocation once done, waiting for it up to `timeout_s` (0: ask once).
        DeadlineExceeded when it is not done by then (it goes on: ask again later),
        FunctionNotFound when no job of that id is kept (never submitted, or its result
        expired), else the FaasError its run ended with."""
        job_id = job.id if isinstance(job, Job) else job
        if not protocol.valid_request_key(job_id):
            raise BadRequest("a job id is 16-128 printable ASCII characters")
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + timeout_s, 0.05
        while True:
            try:
                reply = await self.nc.request(protocol.JOBS_RESULT_SUBJECT, b"", timeout=_JOB_ANSWER_S,
                                              headers={protocol.HDR_REQUEST_KEY: job_id})
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                reply = None  # no node answered this time: ask again while there is time
            if reply is not None:
                headers = reply.headers or {}
                state = headers.get(protocol.HDR_JOB_STATE)
                if state == "done" or protocol.HDR_ERROR_CODE in headers:
                    return protocol.parse_reply(reply.data, headers)
            left = deadline - loop.time()
            if left <= 0:
                where = f"still {state}" if reply is not None else "not answered by any node"
                raise DeadlineExceeded(f"job {request_id_of(job_id)} is {where} after {timeout_s:g}s: "
                                       "ask again later")
            await asyncio.sleep(min(pause, left))
            pause = min(2 * pause, 1.0)

    def _hold(self, request_id: str) -> str:
        """A new key for a request id this client sends (one request per id at a time)."""
        if request_id in self._keys:
            raise ValueError(f"a request with id {request_id!r} is in flight from this client")
        key = self._keys[request_id] = protocol.new_request_key()
        return key

    async def _send(self, subject: str, body: bytes, reply: str, headers: dict[str, str]) -> None:
        try:
            await self.nc.publish(subject, body, reply=reply, headers=headers)
        except nats.errors.MaxPayloadError:
            raise self._too_large("request", body, headers) from None

    def _too_large(self, what: str, body: bytes, headers: dict[str, str]) -> PayloadTooLarge:
        return PayloadTooLarge(f"the {what} takes {protocol.wire_size(body, headers)} bytes, over the "
                               f"server's max payload of {self.nc.max_payload}")

    async def _await_reply(self, sub: Any, deadline: float, function: str) -> Any:
        """The reply on `sub`, or None when the node that acknowledged the request died."""
        loop = asyncio.get_running_loop()
        node, missed, sent = None, 0, loop.time()
        while (left := deadline - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=min(1.0, left))
            except nats.errors.TimeoutError:
                raise_if_cancelled()
                if node is None and function in self._acknowledging and loop.time() - sent > _ACK_WAIT_S:
                    return None
                if node is not None:
                    alive = await node_alive(self.nc, node)
                    missed = 0 if alive else missed + 1
                    if alive is False or missed >= 3:
                        return None
                continue
            raise_if_cancelled()
            headers = msg.headers or {}
            if headers.get("Status") == "503" and not msg.data:
                if node is None:
                    raise Overloaded("no faas node is serving: nothing subscribes to "
                                     f"{protocol.invoke_subject(function)}")
                continue
            if protocol.HDR_ACK in headers and protocol.HDR_ERROR_CODE not in headers and not msg.data:
                node = headers[protocol.HDR_ACK]
                self._acknowledging.add(function)
                continue
            return msg
        return None

    def stream(self, function: str, event: dict[str, Any] | None = None, *,
               timeout_s: float = 60.0, request_id: str | None = None) -> Stream:
        """Call `function` asking for its text as it is generated (the handler streams what
        it generates with `stream=True`). Use as `async with client.stream(...) as s:` and
        iterate `s` for `Chunk`s; `s.result` then holds the reply. Leaving the block early
        (or `await s.cancel()`) cancels the request: its generation stops."""
        return Stream(self, function, event or {}, timeout_s, request_id)

    async def publish(self, subject: str, event: dict[str, Any] | None = None, *,
                      msg_id: str | None = None) -> int:
        """Publish an event for the functions triggered by `subject` and return its stream
        sequence once JetStream stored it. Its `Nats-Msg-Id` (`msg_id`, else a new id) lets
        the stream drop a duplicate published again within two minutes (a producer retrying
        after a lost ack), and reaches handlers as `ctx.event_info.msg_id`."""
        headers = {protocol.HDR_CONTENT_TYPE: Encoding.MSGPACK.content_type,
                   protocol.HDR_MSG_ID: msg_id or protocol.new_request_id()}
        body = _encode(event)
        try:
            ack = await self.nc.jetstream().publish(subject, body, headers=headers)
        except nats.errors.MaxPayloadError:
            raise self._too_large("event", body, headers) from None
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            raise Overloaded(f"no JetStream stream stores {subject!r} (is a node with triggers "
                             "up?)") from None
        except nats.errors.TimeoutError:
            raise Overloaded(f"JetStream did not acknowledge the event on {subject!r}") from None
        except nats.js.errors.APIError as exc:  # e.g. the events stream is full
            raise Overloaded(f"JetStream refused the event on {subject!r}: {exc.description}") from None
        return ack.seq

    async def cancel(self, request_id: str) -> None:
        """Cancel a request of this client in flight (queued or generating) by its id: the
        cancel carries the request's key, without which nodes ignore it. A request that is
        not in flight from this client any more (it ended) is left alone."""
        key = self._keys.get(request_id)
        if key is not None:
            await self.nc.publish(protocol.cancel_subject(request_id), b"",
                                  headers={protocol.HDR_REQUEST_KEY: key})

    async def nodes(self, wait_s: float = 0.5) -> list[dict[str, Any]]:
        """What every reachable node serves: its functions, sandboxes, plan and paths (each
        node answers `faas.admin.ls`; replies gathered for wait_s). An operator's view: it
        needs a login that may publish there (not a producer's, on the embedded server)."""
        return await listing(self.nc, wait_s)


async def listing(nc: NATS, wait_s: float = 0.5) -> list[dict[str, Any]]:
    """Every node's answer to `faas.admin.ls`, by node id."""
    replies = [protocol.decode(msg.data, msg.headers)
               for msg in await gather(nc, protocol.ADMIN_LS_SUBJECT, wait_s)]
    return sorted(replies, key=lambda r: r.get("node", ""))


async def node_alive(nc: NATS, node: str) -> bool | None:
    """Whether a faas node answers a ping: False when it is gone (nothing subscribes to its
    ping subject any more), None when the ping timed out (busy, or unreachable)."""
    try:
        await nc.request(protocol.node_ping_subject(node), b"", timeout=1.0)
        return True
    except nats.errors.NoRespondersError:
        return False
    except nats.errors.TimeoutError:
        return None


async def gather(nc: NATS, subject: str, wait_s: float = 0.5) -> list[Any]:
    """Every reply to one request on `subject` that arrives within `wait_s` (a request that
    each node answers: listings, NATS micro PING/INFO/STATS)."""
    inbox = nc.new_inbox()
    replies: list[Any] = []
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        loop = asyncio.get_running_loop()
        end = loop.time() + wait_s
        while (left := end - loop.time()) > 0:
            try:
                replies.append(await sub.next_msg(timeout=left))
            except nats.errors.TimeoutError:
                break
    finally:
        await sub.unsubscribe()
    return replies


def _encode(event: dict[str, Any] | None) -> bytes:
    """An event as msgpack; BadRequest when msgpack cannot carry it (an int beyond 64 bits,
    nesting beyond its limit, an object)."""
    try:
        return protocol.encode(event or {}, Encoding.MSGPACK)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"the event cannot be sent as msgpack: {type(exc).__name__}: {str(exc)[:200]}") from None


def _positive(timeout_s: float) -> float:
    if not 0 < timeout_s < float("inf"):
        raise ValueError("timeout_s must be positive")
    return timeout_s


def _request_headers(timeout_s: float, request_id: str, key: str) -> dict[str, str]:
    _positive(timeout_s)
    if not protocol.valid_request_id(request_id):
        raise ValueError("a request id is 1-64 letters, digits, '-' or '_'")
    return {protocol.HDR_CONTENT_TYPE: Encoding.MSGPACK.content_type, protocol.HDR_REQUEST_ID: request_id,
            protocol.HDR_REQUEST_KEY: key, protocol.HDR_TIMEOUT_MS: str(int(timeout_s * 1000))}


class Stream:
    """A streamed invocation (see `Client.stream`): its chunks, then its reply."""

    def __init__(self, client: Client, function: str, event: dict[str, Any], timeout_s: float,
                 request_id: str | None) -> None:
        self._client = client
        self.function = function
        self.request_id = request_id or protocol.new_request_id()
        self._timeout_s = timeout_s
        self._event = event
        self._sub: Any = None
        self._end = 0.0
        self.result: Invocation | None = None
        self._done = False

    async def __aenter__(self) -> Stream:
        nc = self._client.nc
        key = self._client._hold(self.request_id)
        try:
            # Acknowledged (and again while it runs): that keeps its reply route alive.
            headers = {**_request_headers(self._timeout_s, self.request_id, key),
                       protocol.HDR_STREAM: "true", protocol.HDR_ACK: "true"}
            inbox = nc.new_inbox()
            self._sub = await nc.subscribe(inbox)
            self._end = asyncio.get_running_loop().time() + self._timeout_s + _REPLY_GRACE_S
            await self._client._send(protocol.invoke_subject(self.function), _encode(self._event),
                                     inbox, headers)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._done:
            await self.cancel()
        await self._close()

    async def _close(self) -> None:
        self._client._keys.pop(self.request_id, None)
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Chunk:
        while not self._done:
            left = self._end - asyncio.get_running_loop().time()
            try:
                msg = await self._sub.next_msg(timeout=max(0.001, left))
            except nats.errors.TimeoutError:
                raise_if_cancelled()
                self._done = True
                raise DeadlineExceeded(f"no reply from {self.function!r} within {self._timeout_s}s") from None
            raise_if_cancelled()
            headers = msg.headers or {}
            if headers.get("Status") == "503" and not msg.data:
                self._done = True
                raise Overloaded("no faas node is serving: nothing subscribes to "
                                 f"{protocol.invoke_subject(self.function)}")
            if protocol.is_final(headers):
                self._done = True
                self.result = protocol.parse_reply(msg.data, headers)
                break
            if protocol.HDR_ACK in headers and not msg.data:
                continue
            chunk = protocol.decode(msg.data, headers)
            return Chunk(delta=chunk["delta"], token_ids=list(chunk["token_ids"]))
        raise StopAsyncIteration

    async def cancel(self) -> None:
        """Stop the request; the node answers it with a 499."""
        self._done = True
        await self._client.cancel(self.request_id)
