"""The node agent: subscribes to invocations, admits them, hands each to an owned task that
leases a sandbox of its function, and replies exactly once (output or error).

It runs no user code and imports no torch: specs come from a discovery subprocess and
handlers run in sandbox processes.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout

from faas import protocol
from faas.bundled import faas_home
from faas.client import node_alive
from faas.errors import (
    BadRequest,
    DeadlineExceeded,
    FaasError,
    FunctionNotFound,
    HandlerError,
    Overloaded,
)
from faas.logs import get_logger
from faas.protocol import Encoding, Metrics
from runtime.backbones import BackboneRegistry
from runtime.batching import Contention
from runtime.catalog import Catalog
from runtime.cluster import Cluster
from runtime.deployed import Deployments, ModelFinder
from runtime.events import EventConsumers, EventsConfig
from runtime.history import History
from runtime.isolation import Isolation
from runtime.levels import Profiles
from runtime.metrics import NodeMetrics
from runtime.offload import MemoryGuard, node_budget
from runtime.outputs import FunctionOutputs
from runtime.plan import Budget
from runtime.pool import FunctionPool
from runtime.preload import PreloadConfig, Preloader
from runtime.sandboxes import SandboxConfig, Zygote
from runtime.service import NodeService
from runtime.stats import NodeStats


def default_node_id() -> str:
    """HOSTNAME-<6 hex>, as one subject token (a hostname's dots become dashes)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:48]
    return f"{host}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class NodeConfig:
    node_id: str = field(default_factory=default_node_id)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    drain_timeout_s: float = 30.0
    device: str = "cpu"
    # How long an unused backbone stays exported when nothing pre-loads (with the
    # pre-loader, the plan pins the backbones worth keeping and the rest go after its linger).
    backbone_keep_alive_s: float = 300.0
    loader_isolation: Isolation = field(default_factory=Isolation)
    preload: PreloadConfig = field(default_factory=PreloadConfig)
    # Batch windows under contention (runtime/batching.py); how many windows may prefill at
    # once (None: one per core's worth of sandbox threads on CPU, 2 on a GPU).
    batch_windows: bool = True
    prefill_parallel: int | None = None
    # What the node may hold (runtime/offload.py); None: 3/4 of RAM, 9/10 of the GPU.
    memory_budget_gib: float | None = None
    device_memory_budget_gib: float | None = None
    events: EventsConfig = field(default_factory=EventsConfig)
    # Where deployed functions' backbones are looked up by fingerprint ($FAAS_HOME/models too).
    models_dirs: tuple[Path, ...] = ()
    # Requests that would start cold here go to a node where their function is warm.
    forwarding: bool = True
    metrics_port: int | None = None  # Prometheus /metrics
    metrics_host: str = "127.0.0.1"


def _header_ms(headers: dict[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number of ms, got {raw!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise BadRequest(f"{name} must be positive, got {raw!r}")
    return value


# How long past the request's deadline a forwarding node waits for its peer's 504.
_FORWARD_GRACE_S = 5.0


def _forward_headers(headers: dict[str, str], node_id: str, request_id: str) -> dict[str, str]:
    """The request's headers for a peer: marked as forwarded (so it is served there, not
    forwarded again) with its budget as an absolute deadline (a fallback here, or the peer,
    must not start it afresh). BadRequest when the budget headers are not numbers."""
    timeout_ms = _header_ms(headers, protocol.HDR_TIMEOUT_MS)
    deadline_ms = _header_ms(headers, protocol.HDR_DEADLINE_MS)
    # Without either the function's timeout_s applies; the peer caps it, the relay waits
    # for a day at most.
    limit = time.time() * 1000 + (timeout_ms if timeout_ms is not None else 86_400_000)
    deadline = min(limit, deadline_ms) if deadline_ms is not None else limit
    return {**headers, protocol.HDR_FORWARDED_BY: node_id, protocol.HDR_REQUEST_ID: request_id,
            protocol.HDR_DEADLINE_MS: str(int(deadline))}


def _budget_s(headers: dict[str, str], spec: dict[str, Any]) -> float:
    """The request's budget: the caller's `Faas-Timeout-Ms` and `Faas-Deadline-Ms` (Unix
    time), capped by the function's `timeout_s` (the function's own limit wins, so a caller
    cannot pin a sandbox longer). DeadlineExceeded when the deadline has passed already."""
    budget = float(spec["timeout_s"])
    timeout_ms = _header_ms(headers, protocol.HDR_TIMEOUT_MS)
    if timeout_ms is not None:
        budget = min(budget, timeout_ms / 1000)
    deadline_ms = _header_ms(headers, protocol.HDR_DEADLINE_MS)
    if deadline_ms is not None:
        left = deadline_ms / 1000 - time.time()
        if left <= 0:
            raise DeadlineExceeded(f"the request's deadline passed {-left:.3f}s before it arrived")
        budget = min(budget, left)
    return budget


@dataclass
class _InFlight:
    """A request this node holds: its cancel signal and where its reply goes (a caller's
    retry, after the node that forwarded the request here died, moves it to its inbox)."""

    reply: str
    cancel: asyncio.Event = field(default_factory=asyncio.Event)


class Node:
    """Serves the given function specs on one NATS connection."""

    def __init__(self, nc: NATS, catalog: Catalog, config: NodeConfig) -> None:
        self.nc = nc
        specs = catalog.specs
        self.config = config
        self.node_id = config.node_id
        preload = config.preload
        self.backbones = BackboneRegistry(
            config.device, preload.linger_s if preload.enabled else config.backbone_keep_alive_s,
            config.sandbox.threads, config.loader_isolation)
        self.zygote = Zygote(config.sandbox.threads)
        self.outputs = FunctionOutputs(nc, self.node_id)
        self.sandbox_config = replace(config.sandbox, on_output=self.outputs.add)
        self.profiles = Profiles(config.device)
        parallel = config.prefill_parallel or (
            max(1, (os.cpu_count() or 1) // config.sandbox.threads) if config.device == "cpu" else 2)
        self.contention = Contention(config.device, parallel,
                                     lambda: sum(1 for pool in self.pools.values() if pool.serving))
        self.history = History(nc, self.node_id, {spec["name"] for spec in specs},
                               on_arrival=self._on_history)
        self.cluster = Cluster(nc, self.node_id, self.warm_state)
        # The pre-loader and the memory guard see the pools as they come and go.
        self.pools: dict[str, FunctionPool] = {}
        self.preloader = (Preloader(self.pools, self.backbones, self.profiles, self.history,
                                    preload, config.device, share=self.cluster.share)
                          if preload.enabled else None)
        budget = node_budget(config.memory_budget_gib, config.device_memory_budget_gib, config.device)
        self.guard = MemoryGuard(self.pools, self.backbones, self.profiles, budget,
                                 self.preloader.value if self.preloader else lambda name: 0.0)
        for spec in specs:
            # Fails closed: a function without an isolation decision is a bug, not root access.
            self.pools[spec["name"]] = self._pool(spec, catalog.isolation[spec["name"]])
        self.deployments = Deployments(
            nc, catalog, ModelFinder((*config.models_dirs, faas_home() / "models")),
            self.add_function, self.remove_function, local=set(self.pools),
            root=faas_home() / "deployed" / self.node_id)
        self.metrics = (NodeMetrics(self.node_id, self.guard.held, config.metrics_port, config.metrics_host)
                        if config.metrics_port else None)
        self.stats = NodeStats(self.metrics)
        self.service = NodeService(nc, self)
        if self.preloader is not None:  # it plans within what the node may hold
            planned = self.preloader.budget
            self.preloader.budget = Budget(min(planned.host_bytes, budget.host_bytes),
                                           min(planned.device_bytes, budget.device_bytes))
        self.events = EventConsumers(nc, self.pools, self.history, config.events)
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[str, _InFlight] = {}  # by request id
        self._subs: list[Subscription] = []  # what brings requests: closed first on drain
        self._control: list[Subscription] = []  # cancels and pings: kept until those are answered
        self.log = get_logger(node=self.node_id)

    def _pool(self, spec: dict[str, Any], isolation: Isolation) -> FunctionPool:
        pool = FunctionPool(
            spec, self.sandbox_config, self.zygote, self.backbones, isolation, self.profiles,
            keep_alive_s=None if self.config.preload.enabled else self.config.sandbox.keep_alive_s,
            on_change=self._on_pool_change,
            contention=self.contention if self.config.batch_windows else None)
        pool.guard = self.guard
        return pool

    async def start(self) -> None:
        """Subscribe; when this returns the server knows every subscription and the node
        serves what is deployed."""
        if self.metrics is not None:
            self.metrics.serve()
        self.zygote.start()
        self.contention.start()
        await self.outputs.start()
        await self.deployments.start()  # first: the history keeps the functions served
        await self.history.start()
        await self.cluster.start()
        # Every node hears every cancel; the one holding the request acts on it.
        self._control.append(await self.nc.subscribe(protocol.CANCEL_WILDCARD, cb=self._on_cancel))
        self._subs.append(await self.nc.subscribe(protocol.ADMIN_LS_SUBJECT, cb=self._on_ls))
        self._subs.append(await self.nc.subscribe(
            protocol.node_invoke_subject(self.node_id, "*"), cb=self._on_forwarded))
        self._control.append(await self.nc.subscribe(protocol.node_ping_subject(self.node_id),
                                                  cb=self._on_ping))
        self._subs.append(await self.nc.subscribe(
            protocol.INVOKE_WILDCARD, queue=protocol.NODE_QUEUE_GROUP, cb=self._on_invoke))
        await self.nc.flush()
        await self.events.start()
        await self.service.start()
        if self.preloader is not None:
            self.preloader.start()  # its first plan is the deploy's
        self.log.info("node_started", functions=sorted(self.pools),
                      preload=self.config.preload.predictor if self.preloader else "off")

    async def add_function(self, spec: dict[str, Any], isolation: Isolation) -> None:
        """Serve `spec` from now on (a deploy); a version served before stops taking
        requests and ends once those it holds are answered."""
        name = spec["name"]
        old = self.pools.get(name)
        self.pools[name] = self._pool(spec, isolation)
        self.history.functions.add(name)
        await self.events.add(name, self.pools[name])
        if old is not None:
            self._own(old.close())
        self.service.refresh()
        self._on_pool_change()

    async def remove_function(self, name: str) -> None:
        """Stop serving `name` (removed from the cluster): new requests get a 404 (or go to
        a node still serving it), those in flight are answered."""
        pool = self.pools.pop(name, None)
        self.history.functions.discard(name)
        await self.events.remove(name)
        if pool is not None:
            self._own(pool.close())
        self.service.refresh()
        self._on_pool_change()

    def _on_history(self, _function: str) -> None:
        if self.preloader is not None:
            self.preloader.poke()

    def _on_pool_change(self) -> None:
        if self.preloader is not None:
            self.preloader.poke()
        self.cluster.poke()

    def warm_state(self) -> dict[str, Any]:
        """What other nodes read to forward here and to share pre-loading: the functions it
        serves, whether a loaded sandbox of each has room and how loaded it is, and whether
        its memory is nearly full."""
        functions = {name: {"room": pool.warm_room, "load": round(pool.load, 3)}
                     for name, pool in self.pools.items()}
        return {"node": self.node_id, "functions": functions, "overloaded": self.guard.full()}

    # --- request path ---------------------------------------------------------------

    async def _on_invoke(self, msg: Msg) -> None:
        await self._admit(msg, may_forward=self.config.forwarding)

    async def _on_forwarded(self, msg: Msg) -> None:
        """A request another node sent here (its function is warm here): never forwarded on."""
        await self._admit(msg, may_forward=False)

    async def _on_ping(self, msg: Msg) -> None:
        if msg.reply and protocol.valid_reply_subject(msg.reply):
            await self._publish(msg.reply, b"ok", {}, self.log)

    async def _admit(self, msg: Msg, may_forward: bool) -> None:
        """Decode and admit only; the work runs in an owned task so no request of one
        function waits behind another."""
        received = time.monotonic()
        headers = msg.headers or {}
        encoding = protocol.request_encoding(msg.data, headers)
        request_id = headers.get(protocol.HDR_REQUEST_ID) or protocol.new_request_id()
        function = protocol.function_from_subject(msg.subject)
        log = self.log.bind(fn=function, req=request_id)
        if not msg.reply or not protocol.valid_reply_subject(msg.reply):
            # A reply subject in a system or faas namespace would make the node publish
            # there with its own rights (e.g. into a KV bucket): no reply at all.
            log.warning("invoke_reply_subject_refused", reply=msg.reply)
            return
        stream = protocol.wants_stream(headers)
        final = {protocol.HDR_FINAL: "true"} if stream else {}
        held = self._inflight.get(request_id)
        if held is not None and (held.reply == msg.reply or protocol.HDR_RETRY in headers):
            # A caller's retry of a request in flight here (the node it reached first, or
            # the one that forwarded it here, died): it is answered where the caller listens now.
            held.reply = msg.reply
            await self._ack(msg, headers, log)
            return
        try:
            if held is not None:  # its replies and cancels would be ambiguous
                raise BadRequest(f"a request with id {request_id!r} is already in flight")
            pool = self.pools.get(function)
            if may_forward and (pool is None or not pool.warm_room):
                peer = self.cluster.pick(function, served_here=pool is not None)
                if peer is not None:
                    await self._ack(msg, headers, log)
                    self._own(self._forward(msg, peer, function, request_id, stream, log))
                    return
            if pool is None:
                raise FunctionNotFound(f"no function named {function!r}"
                                       + self._why_not_here(function))
            event = protocol.decode_event(msg.data, encoding)
            deadline = received + _budget_s(headers, pool.spec)
            await self.history.record(function)  # demand, even when the queue is full
            pool.admit()
        except FaasError as err:
            await self._reply_error(msg, err, encoding, request_id, log, final)
            return
        except Exception:  # a bug of ours must still produce a reply, not silence
            log.exception("admit_failed")
            await self._reply_error(msg, HandlerError("internal error in the node"), encoding,
                                    request_id, log, final)
            return
        await self._ack(msg, headers, log)
        flight = self._inflight[request_id] = _InFlight(msg.reply)
        self._own(self._serve(msg, pool, event, encoding, request_id, received, deadline,
                              stream, flight))

    async def _ack(self, msg: Msg, headers: dict[str, str], log: Any) -> None:
        """Tell a caller that asked which node holds its request (so it can retry elsewhere
        if this node dies): the node that forwards a request acknowledges it, not the peer."""
        if headers.get(protocol.HDR_ACK, "").lower() == "true" and not headers.get(protocol.HDR_FORWARDED_BY):
            await self._publish(msg.reply, b"", {protocol.HDR_ACK: self.node_id}, log)

    def _why_not_here(self, function: str) -> str:
        why = self.deployments.unavailable.get(function)
        return f" on this node ({why})" if why else ""

    async def _forward(self, msg: Msg, peer: str, function: str, request_id: str, stream: bool,
                       log: Any) -> None:
        """Send the request to `peer` and relay what it answers (chunks, then the reply) to
        the caller. When the peer is gone before its reply (no responder, or its pings go
        unanswered) the request is served here instead, unless chunks were relayed already:
        a stream cannot be replayed, so it gets a 503."""
        self.stats[function].forwarded += 1
        log = log.bind(peer=peer)
        encoding = protocol.request_encoding(msg.data, msg.headers)
        final = {protocol.HDR_FINAL: "true"} if stream else {}

        async def fail(err: FaasError) -> None:
            await self._reply_error(msg, err, encoding, request_id, log, final)

        try:
            headers = _forward_headers(msg.headers or {}, self.node_id, request_id)
            sub = await self.nc.subscribe(inbox := self.nc.new_inbox())
        except BadRequest as err:
            await fail(err)
            return
        except NatsError as exc:
            await fail(Overloaded(f"cannot forward: {exc}"))
            return
        deadline = int(headers[protocol.HDR_DEADLINE_MS]) / 1000 + _FORWARD_GRACE_S
        relayed = silent = 0
        try:
            await self.nc.publish(protocol.node_invoke_subject(peer, function), msg.data,
                                  reply=inbox, headers=headers)
            while time.time() < deadline:
                try:
                    reply = await sub.next_msg(timeout=1.0)
                except NatsTimeout:
                    alive = await node_alive(self.nc, peer)
                    silent = 0 if alive else silent + 1
                    if alive is False or silent >= 3:
                        break
                    continue
                if (reply.headers or {}).get("Status") == "503":  # nobody subscribes: it is gone
                    break
                await self._publish(msg.reply, reply.data, reply.headers or {}, log)
                relayed += 1
                if not stream or protocol.is_final(reply.headers):
                    return
        except NatsError as exc:
            log.warning("forward_error", error=f"{type(exc).__name__}: {exc}")
        finally:
            try:
                await sub.unsubscribe()
            except NatsError:
                pass
        if time.time() >= deadline:  # the peer lives but never answered (it lost the request)
            await fail(DeadlineExceeded(f"node {peer} did not answer in time"))
            return
        self.cluster.forget(peer)
        if relayed:
            await fail(Overloaded(f"node {peer} stopped answering in the middle of the stream"))
            return
        log.warning("forward_failed_serving_here")
        await self._admit(msg, may_forward=False)

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject[len(protocol.CANCEL_PREFIX):]
        flight = self._inflight.get(request_id)
        if flight is not None:
            self.log.info("cancel_requested", req=request_id)
            flight.cancel.set()

    def _own(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task_failed", error=repr(task.exception()))

    async def _serve(self, msg: Msg, pool: FunctionPool, event: dict[str, Any], encoding: Encoding,
                     request_id: str, received: float, deadline: float, stream: bool,
                     flight: _InFlight) -> None:
        log = self.log.bind(fn=pool.name, req=request_id)
        final = {protocol.HDR_FINAL: "true"} if stream else {}
        try:
            await self._serve_one(msg, pool, event, encoding, request_id, received, deadline,
                                  stream, flight, final, log)
        finally:
            if self._inflight.get(request_id) is flight:
                del self._inflight[request_id]

    async def _serve_one(self, msg: Msg, pool: FunctionPool, event: dict[str, Any],
                         encoding: Encoding, request_id: str, received: float, deadline: float,
                         stream: bool, flight: _InFlight, final: dict[str, str],
                         log: Any) -> None:
        async def send_chunk(chunk: dict[str, Any]) -> None:
            await self._publish(flight.reply, *protocol.chunk_message(chunk, encoding, request_id), log)

        async def fail(err: FaasError) -> None:
            await self._reply_error(msg, err, encoding, request_id, log, final, flight.reply)

        try:
            served = await pool.serve(request_id, event, deadline, received=received, stream=stream,
                                      on_chunk=send_chunk if stream else None, cancel=flight.cancel)
        except FaasError as err:
            await fail(err)
            return
        except asyncio.CancelledError:
            await fail(Overloaded("the node shut down before the request completed"))
            raise
        except Exception:
            log.exception("serve_failed")
            await fail(HandlerError("internal error in the node"))
            return
        result = served.result
        ttft_ms = None
        if result.first_token_at is not None:
            ttft_ms = round((result.first_token_at - received) * 1000, 3)
        metrics = Metrics(request_id=request_id, node=self.node_id,
                          queue_ms=round((served.leased_at - received) * 1000, 3),
                          ttft_ms=ttft_ms, tokens_in=result.tokens_in, tokens_out=result.tokens_out,
                          level=served.level.label, batch=result.batch)
        metrics.total_ms = round((time.monotonic() - received) * 1000, 3)
        try:
            body, headers = protocol.ok_reply(result.output, metrics, encoding)
        except (TypeError, ValueError) as exc:
            await fail(HandlerError(f"output cannot be encoded as {encoding.value}: {exc}"))
            return
        headers.update(final)
        size = protocol.wire_size(body, headers)
        if size > self.nc.max_payload:
            await fail(HandlerError(f"reply of {size} bytes exceeds the server's max payload "
                                    f"of {self.nc.max_payload} bytes"))
            return
        await self._publish(flight.reply, body, headers, log)
        self.stats.answered(pool.name, metrics.ttft_ms, metrics.total_ms, served.level.label)
        log.info("invoked", found=served.level.label, queue_ms=metrics.queue_ms, ttft_ms=metrics.ttft_ms,
                 total_ms=metrics.total_ms, batch=result.batch)

    async def _reply_error(self, msg: Msg, err: FaasError, encoding: Encoding, request_id: str,
                           log: Any, final: dict[str, str] | None = None, to: str | None = None) -> None:
        log.warning("invoke_failed", code=err.code, error=err.message)
        function = protocol.function_from_subject(msg.subject)
        if function in self.pools:  # not for names nobody serves: no unbounded table
            self.stats.failed(function, err.code)
        body, headers = protocol.error_reply(err, encoding, request_id)
        headers.update(final or {})
        await self._publish(to or msg.reply, body, headers, log)

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str], log: Any) -> None:
        try:
            await self.nc.publish(subject, body, headers=headers)
        except NatsError as exc:
            log.error("reply_failed", error=f"{type(exc).__name__}: {exc}")

    # --- introspection --------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What `faas ls` shows: this node's functions, their sandboxes and levels, and what
        the pre-loader planned for each and why."""
        preloader = self.preloader
        return {"node": self.node_id, "backbones": self.backbones.state(),
                "preload": preloader.summary() if preloader else None,
                "contention": self.contention.state(), "memory": self.guard.state(),
                "events": self.events.state(), "cluster": {"peers": sorted(self.cluster.live_peers())},
                "deployed": {"serving": self.deployments.versions,
                             "unavailable": self.deployments.unavailable},
                "functions": [
            {"name": name, "backbone": pool.spec["backbone"], "adapter": pool.spec["adapter"],
             "timeout_s": pool.spec["timeout_s"], "max_queue": pool.spec["max_queue"],
             "max_batch": pool.max_batch, "window": pool.window.state() if pool.window else None,
             "triggers": pool.spec.get("triggers", []), "version": pool.spec.get("deployed"),
             "openai": pool.spec.get("openai", False),
             "stats": self.stats[name].summary(),
             **pool.state(), **(preloader.describe(name) if preloader else {})}
            for name, pool in sorted(self.pools.items())]}

    async def _on_ls(self, msg: Msg) -> None:
        if msg.reply and protocol.valid_reply_subject(msg.reply):
            encoding = protocol.request_encoding(msg.data, msg.headers)
            await self._publish(msg.reply, protocol.encode(self.describe(), encoding),
                                protocol.reply_headers(encoding, ""), self.log)

    # --- shutdown -------------------------------------------------------------------

    async def _drain_subs(self, subs: list[Subscription]) -> None:
        for sub in subs:
            try:
                await sub.drain()
            except NatsError as exc:
                self.log.warning("unsubscribe_failed", error=str(exc))

    async def drain(self) -> None:
        """Stop taking requests, answer what is in flight (cancelled past the drain timeout,
        still with a reply), then stop every sandbox."""
        self.log.info("node_draining", in_flight=len(self._tasks))
        await self.cluster.close()  # peers stop forwarding here
        await self.service.stop()
        await self.deployments.close()
        await self._drain_subs(self._subs)
        await self.events.close(self.config.drain_timeout_s)  # no new event; those in flight end
        if self.preloader is not None:  # nothing new starts ahead of requests from now on
            await self.preloader.close()
        await self.history.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Callers of what was in flight pinged this node to tell slow from dead: until now.
        await self._drain_subs(self._control)
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        self.deployments.remove_files()
        await self.outputs.close()
        await self.contention.close()
        await self.zygote.close()
        await self.backbones.close()
        if self.metrics is not None:
            await self.metrics.close()
        self.log.info("node_drained")
