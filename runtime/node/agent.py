"""The node agent: subscribes to invocations, admits them, hands each to an owned task that
leases a sandbox of its function, and replies exactly once (output or error).

It runs no user code and imports no torch: specs come from a discovery subprocess and
handlers run in sandbox processes. What every invocation goes through is
runtime/node/invocation.py; this module wires the node's parts together (the longest part of
it), takes requests off NATS (their reply subject, headers, retries and acknowledgements),
lists the node for `faas ls` and drains it.
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

from faas import protocol
from faas.bundled import faas_home
from faas.errors import (
    BadRequest,
    FaasError,
    FunctionNotFound,
    HandlerError,
)
from faas.logs import get_logger
from faas.record import FunctionRecord
from faas.secrets import secret_values
from runtime.backbone.registry import BackboneRegistry
from runtime.batching.window import Contention
from runtime.engine.registry import EngineRegistry
from runtime.functions.catalog import Catalog
from runtime.memory.budget import Budget, machine_budget
from runtime.memory.guard import MemoryGuard
from runtime.node.cluster import Cluster
from runtime.node.deployments import Deployments, ModelFinder
from runtime.node.events import EventConsumers, EventsConfig
from runtime.node.forwarding import Forwarder
from runtime.node.jobs import Jobs, JobsConfig
from runtime.node.inflight import Flight, InFlight
from runtime.node.invocation import Arrivals, Call, Invocations, deadline_of
from runtime.node.metrics import NodeMetrics
from runtime.node.replies import Reply, answer
from runtime.node.service import NodeService
from runtime.node.stats import NodeStats
from runtime.pool.leases import FunctionPool
from runtime.preload.history import History
from runtime.preload.preloader import PreloadConfig, Preloader
from runtime.proc.isolation import Isolation
from runtime.proc.usage import GIB
from runtime.sandbox.handles import SandboxConfig
from runtime.sandbox.levels import Profiles
from runtime.sandbox.outputs import FunctionOutputs
from runtime.sandbox.spawn import Zygote


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
    # Batch windows under contention (runtime/batching/window.py); how many windows may prefill at
    # once (None: one per core's worth of sandbox threads on CPU, 2 on a GPU).
    batch_windows: bool = True
    prefill_parallel: int | None = None
    # What the node may hold (runtime/memory/); None: 3/4 of RAM, 9/10 of the GPU.
    memory_budget_gib: float | None = None
    device_memory_budget_gib: float | None = None
    engine_kv_gib: float | None = None  # each engine's KV cache (None: its default)
    events: EventsConfig = field(default_factory=EventsConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    # Where deployed functions' backbones are looked up by fingerprint ($FAAS_HOME/models too).
    models_dirs: tuple[Path, ...] = ()
    # Requests that would start cold here go to a node where their function is warm.
    forwarding: bool = True
    metrics_port: int | None = None  # Prometheus /metrics
    metrics_host: str = "127.0.0.1"
    # A caller that asked for acknowledgements gets one again this often while its request
    # runs: it keeps a reply route alive across NATS accounts (a service import forgets a
    # stream of answers that stays silent for its response threshold; runtime/node/natsd.py).
    ack_every_s: float = 30.0


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
        self.engines = EngineRegistry(
            self.backbones, keep_alive_s=self.backbones.keep_alive_s, isolation=config.loader_isolation,
            max_rows=config.sandbox.max_batch,
            kv_bytes=int(config.engine_kv_gib * GIB) if config.engine_kv_gib is not None else None)
        self.zygote = Zygote(config.sandbox.threads)
        # Sandboxes that do not map the backbone (they generate in the engine, or are plain
        # Python): no torch to import or to fork.
        self.light_zygote = Zygote(config.sandbox.threads, light=True)
        self.outputs = FunctionOutputs(nc, self.node_id)
        self.sandbox_config = replace(config.sandbox, on_output=self.outputs.add,
                                      max_frame_bytes=nc.max_payload + (64 << 10),
                                      environment=self._environment)
        self.profiles = Profiles(config.device)
        parallel = config.prefill_parallel or (
            max(1, (os.cpu_count() or 1) // config.sandbox.threads) if config.device == "cpu" else 2)
        self.contention = Contention(config.device, parallel,
                                     lambda: sum(1 for pool in self.pools.values() if pool.serving))
        self.history = History(nc, self.node_id, {spec.name for spec in specs},
                               on_arrival=self._on_history)
        self.cluster = Cluster(nc, self.node_id, self.warm_state)
        # The pre-loader and the memory guard see the pools as they come and go.
        self.pools: dict[str, FunctionPool] = {}
        self.preloader = (Preloader(self.pools, self.backbones, self.profiles, self.history,
                                    preload, config.device, share=self.cluster.share,
                                    engines=self.engines)
                          if preload.enabled else None)
        # The node's budget: three quarters of the machine's memory, nine tenths of the GPU's.
        budget = machine_budget(config.memory_budget_gib, config.device_memory_budget_gib, config.device,
                                3 / 4, 9 / 10)
        self.guard = MemoryGuard(self.pools, self.backbones, self.profiles, budget,
                                 self.preloader.value if self.preloader else lambda name: 0.0,
                                 self.engines)
        for spec in specs:
            # Fails closed: a function without an isolation decision is a bug, not root access.
            self.pools[spec.name] = self._pool(spec, catalog.isolation[spec.name])
        self.deployments = Deployments(
            nc, catalog, ModelFinder((*config.models_dirs, faas_home() / "models")),
            self.add_function, self.remove_function, local=set(self.pools),
            root=faas_home() / "deployed" / self.node_id)
        self.metrics = (NodeMetrics(self.node_id, self.guard.held, config.metrics_port, config.metrics_host)
                        if config.metrics_port else None)
        self.stats = NodeStats(self.metrics)
        self.inflight = InFlight()  # every request held, whatever brought it
        self.invocations = Invocations(self.pools, (Arrivals(self.history), self.stats), self.node_id)
        self.forwarder = Forwarder(nc, self.node_id, self.cluster, self.inflight, self.stats,
                                   self.invocations, lambda msg, flight: self._admit(msg, False, flight))
        self.service = NodeService(nc, self)
        if self.preloader is not None:  # it plans within what the node may hold
            planned = self.preloader.budget
            self.preloader.budget = Budget(min(planned.host_bytes, budget.host_bytes),
                                           min(planned.device_bytes, budget.device_bytes))
        self.events = EventConsumers(nc, self.pools, self.invocations, self.inflight, config.events)
        self.jobs = Jobs(nc, self.node_id, self.knows, config.jobs)
        self._tasks: set[asyncio.Task[None]] = set()
        self._reacking: asyncio.Task[None] | None = None
        self._subs: list[Subscription] = []  # what brings requests: closed first on drain
        self._control: list[Subscription] = []  # cancels and pings: kept until those are answered
        self.log = get_logger(node=self.node_id)

    async def _environment(self, spec: FunctionRecord) -> dict[str, str]:
        """A sandbox's environment: its function's settings and secrets (read from NATS as
        the sandbox starts, so a changed secret reaches the next one)."""
        return {**dict(spec.env), **await secret_values(self.nc, spec.secrets, spec.name)}

    def _zygote_of(self, spec: FunctionRecord) -> Zygote:
        return self.zygote if spec.maps_backbone else self.light_zygote

    def _pool(self, spec: FunctionRecord, isolation: Isolation) -> FunctionPool:
        return FunctionPool(
            spec, self.sandbox_config, self._zygote_of(spec),
            self.backbones, isolation, self.profiles,
            keep_alive_s=None if self.config.preload.enabled else self.config.sandbox.keep_alive_s,
            on_change=self._on_pool_change,
            contention=self.contention if self.config.batch_windows else None, engines=self.engines,
            guard=self.guard)

    async def start(self) -> None:
        """Subscribe; when this returns the server knows every subscription and the node
        serves what is deployed."""
        if self.metrics is not None:
            self.metrics.serve()
        # Only the zygotes the served functions fork from: the one with torch holds a few
        # hundred MiB that a node whose functions all generate in the engine never uses.
        for pool in self.pools.values():
            self._zygote_of(pool.spec).start()
        self.contention.start()
        self._reacking = asyncio.create_task(self._reacknowledge(), name="reacknowledge")
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
        await self.jobs.start()
        await self.service.start()
        if self.preloader is not None:
            self.preloader.start()  # its first plan is the deploy's
        self.log.info("node_started", functions=sorted(self.pools),
                      preload=self.config.preload.predictor if self.preloader else "off")

    async def add_function(self, spec: FunctionRecord, isolation: Isolation) -> None:
        """Serve `spec` from now on (a deploy); a version served before stops taking
        requests and ends once those it holds are answered."""
        name = spec.name
        old = self.pools.get(name)
        self.pools[name] = self._pool(spec, isolation)
        self._zygote_of(spec).start()  # its first sandbox need not wait for the imports
        self.history.functions.add(name)
        await self.events.add(name, self.pools[name])
        if old is not None:
            self._own(self._retire(old))
        self.service.refresh()
        self._on_pool_change()

    async def serve_local(self, spec: FunctionRecord, isolation: Isolation, backbone: tuple[str, ...]) -> None:
        """Serve a function of the functions folders found or changed after start
        (`faas up --reload`): as a deploy would, its backbone's paths shown to the loaders."""
        for registry in (self.backbones, self.engines):
            shown = registry.isolation
            registry.isolation = replace(shown, expose=(*shown.expose, *(p for p in backbone if p not in shown.expose)))
        self.deployments.local.add(spec.name)
        await self.add_function(spec, isolation)

    async def unserve_local(self, name: str) -> None:
        """Stop serving a function no longer declared in the functions folders."""
        self.deployments.local.discard(name)
        await self.remove_function(name)

    async def remove_function(self, name: str) -> None:
        """Stop serving `name` (removed from the cluster): new requests get a 404 (or go to
        a node still serving it), those in flight are answered."""
        pool = self.pools.pop(name, None)
        self.history.functions.discard(name)
        await self.events.remove(name)
        if pool is not None:
            self._own(self._retire(pool))
        self.service.refresh()
        self._on_pool_change()

    async def _retire(self, pool: FunctionPool) -> None:
        """A version no longer served: its requests are answered, its sandboxes stop, then
        its deployed files go."""
        await pool.close()
        await pool.stopped()
        self.deployments.remove_version(pool.spec)

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
        await self._admit(msg, forwarded=False)

    async def _on_forwarded(self, msg: Msg) -> None:
        """A request another node sent here (its function is warm here): never forwarded on."""
        await self._admit(msg, forwarded=True)

    async def _on_ping(self, msg: Msg) -> None:
        await answer(self.nc, msg.reply, b"ok", None, self.log)

    async def _admit(self, msg: Msg, forwarded: bool, fallback: Flight | None = None) -> None:
        """Check and admit only; the work runs in an owned task so no request of one
        function waits behind another. `forwarded`: a peer sent it (it acknowledged it, and
        it is not forwarded again); `fallback`: this node forwarded it already (that is its
        place in the in-flight table) and the peer went away: it is served here."""
        received = time.monotonic() if fallback is None else fallback.received
        function = protocol.function_from_subject(msg.subject)
        log = self.log.bind(fn=function[:64])
        if not msg.reply or not protocol.valid_reply_subject(msg.reply):
            # A reply subject in a system or faas namespace would make the node publish
            # there with its own rights (e.g. into a KV bucket): no reply at all.
            log.warning("invoke_reply_subject_refused", reply=(msg.reply or "")[:200])
            return
        encoding = protocol.request_encoding(msg.data, msg.headers)
        try:
            request = protocol.parse_request_headers(msg.headers)
        except BadRequest as err:  # its id is not echoed: it may be what is wrong
            await self.invocations.refuse(function, err, Reply(
                self.nc, msg.reply, encoding, protocol.new_request_id(), protocol.wants_stream(msg.headers),
                log), log)
            return
        log = log.bind(req=request.request_id)
        acks = not forwarded and fallback is None
        flight = fallback
        if flight is None:
            held = self.inflight.get(request.request_id)
            if held is not None and (held.reply == msg.reply or request.retry and held.allows(request.key)):
                # A caller's retry of a request in flight here (the node it reached first,
                # or the one that forwarded it here, died): it is answered where the caller
                # listens now.
                held.reply = msg.reply
                held.acks = held.acks or request.ack and acks
                await self._ack(msg.reply, request, acks, log)
                return
            try:  # held from now on, before any await: one id, one request
                flight = self.inflight.take(request.request_id, msg.reply, request.key, received,
                                            acks=request.ack and acks)
            except BadRequest as err:  # its replies and cancels would be ambiguous
                await self.invocations.refuse(function, err, Reply(
                    self.nc, msg.reply, encoding, request.request_id, request.stream, log), log)
                return
        reply = Reply(self.nc, None, encoding, request.request_id, request.stream, log, flight)
        try:
            pool = self.pools.get(function)
            if acks and self.config.forwarding and (pool is None or not pool.warm_room):
                peer = self.cluster.pick(function, served_here=pool is not None)
                if peer is not None:
                    await self._ack(msg.reply, request, acks, log)
                    self._own(self.forwarder.forward(msg, request, peer, function, flight, reply))
                    return
            if pool is None:
                raise FunctionNotFound(f"no function named {function!r}"
                                       + self._why_not_here(function))
            event = protocol.decode_event(msg.data, encoding)
            deadline = deadline_of(pool.spec, received, request)
        except Exception as exc:  # a bug of ours must still produce a reply, not silence
            self.inflight.release(request.request_id, flight)
            if not isinstance(exc, FaasError):
                log.exception("admit_failed")
            err = exc if isinstance(exc, FaasError) else HandlerError("internal error in the node")
            await self.invocations.refuse(function, err, reply, log)
            return
        if not await self.invocations.admit(pool, reply, log):  # demand is recorded even so
            self.inflight.release(request.request_id, flight)
            return
        await self._ack(msg.reply, request, acks, log)
        self._own(self._serve(pool, Call(request.request_id, event, received, deadline, flight.cancel),
                              reply, flight))

    async def _ack(self, reply: str, request: protocol.RequestHeaders, acks: bool, log: Any) -> None:
        """Tell a caller that asked which node holds its request (so it can retry elsewhere
        if this node dies): the node that forwards a request acknowledges it, not the peer."""
        if request.ack and acks:
            await self._send_ack(reply, log)

    async def _send_ack(self, reply: str | None, log: Any) -> None:
        await answer(self.nc, reply, b"", {protocol.HDR_ACK: self.node_id}, log)

    async def _reacknowledge(self) -> None:
        """Every `ack_every_s`, acknowledge again each request held that long whose caller
        asked for acknowledgements (served here, or relayed from a peer): its reply route
        stays alive."""
        while True:
            await asyncio.sleep(self.config.ack_every_s)
            now = time.monotonic()
            for flight in self.inflight.held():
                if flight.acks and now - flight.received >= self.config.ack_every_s:
                    await self._send_ack(flight.reply, self.log)

    def knows(self, function: str) -> bool:
        """Whether `function` is served here or by a live peer, or is deployed (a job for it
        is taken: some node will run it)."""
        return function in self.pools or function in self.deployments.unavailable \
            or any(function in state.get("functions", {}) for state in self.cluster.live_peers().values())

    def _why_not_here(self, function: str) -> str:
        why = self.deployments.unavailable.get(function)
        return f" on this node ({why})" if why else ""

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject[len(protocol.CANCEL_PREFIX):]
        flight = self.inflight.get(request_id)
        if flight is None:
            return
        if flight.allows((msg.headers or {}).get(protocol.HDR_REQUEST_KEY)):
            self.log.info("cancel_requested", req=request_id)
            flight.cancel.set()
        else:
            self.log.warning("cancel_refused", req=request_id, why="no key, or not the request's")

    def _own(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task_failed", error=repr(task.exception()))

    async def _serve(self, pool: FunctionPool, call: Call, reply: Reply, flight: Flight) -> None:
        try:
            await self.invocations.serve(pool, call, reply, reply.log)
        finally:
            self.inflight.release(call.request_id, flight)

    # --- introspection --------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What `faas ls` shows: this node's functions, their sandboxes and levels, and what
        the pre-loader planned for each and why."""
        preloader = self.preloader
        return {"node": self.node_id, "backbones": self.backbones.state(), "engines": self.engines.state(),
                "preload": preloader.summary() if preloader else None,
                "contention": self.contention.state(), "memory": self.guard.state(),
                "events": self.events.state(), "jobs": self.jobs.state(),
                "cluster": {"peers": sorted(self.cluster.live_peers())},
                "deployed": {"serving": self.deployments.versions,
                             "unavailable": self.deployments.unavailable},
                "functions": [
            {"name": name, "backbone": pool.spec.backbone, "adapter": pool.spec.adapter,
             "timeout_s": pool.spec.timeout_s, "max_queue": pool.spec.max_queue,
             "max_batch": pool.max_batch, "window": pool.window.state() if pool.window else None,
             "triggers": list(pool.spec.triggers), "version": pool.spec.deployed,
             "openai": pool.spec.openai,
             "stats": self.stats[name].summary(),
             **pool.state(), **(preloader.describe(name) if preloader else {})}
            for name, pool in sorted(self.pools.items())]}

    async def _on_ls(self, msg: Msg) -> None:
        encoding = protocol.request_encoding(msg.data, msg.headers)
        await answer(self.nc, msg.reply, protocol.encode(self.describe(), encoding),
                     {protocol.HDR_CONTENT_TYPE: encoding.content_type}, self.log)

    # --- shutdown -------------------------------------------------------------------

    async def _drain_subs(self, subs: list[Subscription]) -> None:
        for sub in subs:
            try:
                await sub.drain()
            except NatsError as exc:
                self.log.warning("unsubscribe_failed", error=str(exc))

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking requests, answer what is in flight (cancelled past `grace_s`, by
        default the drain timeout, still with a reply), then stop every sandbox."""
        grace_s = self.config.drain_timeout_s if grace_s is None else grace_s
        self.log.info("node_draining", in_flight=len(self._tasks))
        await self.cluster.close()  # peers stop forwarding here
        await self.service.stop()
        await self.deployments.close()
        await self._drain_subs(self._subs)
        await self.events.close(grace_s)  # no new event; those in flight end
        await self.jobs.close(grace_s)  # no new job; those running end, or run elsewhere later
        if self.preloader is not None:  # nothing new starts ahead of requests from now on
            await self.preloader.close()
        await self.history.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._reacking is not None:
            self._reacking.cancel()
            await asyncio.gather(self._reacking, return_exceptions=True)
        # Callers of what was in flight pinged this node to tell slow from dead: until now.
        await self._drain_subs(self._control)
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        self.deployments.remove_files()
        await self.outputs.close()
        await self.contention.close()
        await self.zygote.close()
        await self.light_zygote.close()
        await self.engines.close()
        await self.backbones.close()
        if self.metrics is not None:
            await self.metrics.close()
        self.log.info("node_drained")
