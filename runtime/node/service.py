"""Each node as a NATS micro service, so standard NATS tooling sees the runtime:
`nats micro ls|info|stats faas-node`, or a request on `$SRV.PING.faas-node` (`INFO`,
`STATS`) answered once per node.

The service's metadata names the node; its one endpoint, `status` (on
`faas.node.<node>.status`), answers the node's full description (what `faas ls` shows),
and the endpoint's `data` in `$SRV.STATS` carries per function the warm level, sandboxes,
queue length, requests, errors, requests per second and TTFT / latency percentiles of the
last minute (what `faas top` shows). Invocations are not micro endpoints: functions come
and go with deploys, and micro has no endpoint removal.

The micro protocol is answered here rather than by `nats.micro`: that one echoes every
request header into its answer (a caller's 1 MiB header would push the answer over the max
payload, and the server would close the node's connection) and answers whatever reply
subject a request names, with the node's rights (a `$KV...` reply subject would write a
bucket). Answers here carry no header and go through runtime/node/replies.py. The answers
themselves are nats.micro's own types, so every NATS tool reads them.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.micro.service import EndpointInfo, EndpointStats, ServiceInfo, ServicePing, ServiceStats
from nats.nuid import NUID

from faas import protocol
from faas.logs import get_logger
from runtime.node.replies import answer

if TYPE_CHECKING:
    from runtime.node.agent import Node

_QUEUE_GROUP = "q"  # nats.micro's default for endpoints


def _version() -> str:
    try:
        return version("faas-lora")
    except PackageNotFoundError:
        return "0.0.0"


class NodeService:
    def __init__(self, nc: NATS, node: Node) -> None:
        self.nc = nc
        self.node = node
        self.id = NUID().next().decode()
        self.version = _version()
        self.started = datetime.now(timezone.utc)
        self.metadata: dict[str, str] = {"node": node.node_id, "device": node.config.device}
        self.status_subject = protocol.node_status_subject(node.node_id)
        self._subs: list[Subscription] = []
        # The status endpoint's counters, as micro reports them (times in ns).
        self._requests = self._errors = self._busy_ns = 0
        self._last_error = ""
        self.refresh()
        self.log = get_logger(component="service")

    def refresh(self) -> None:
        """The functions this node serves, in its INFO/PING metadata (comma-separated)."""
        self.metadata["functions"] = ",".join(sorted(self.node.pools))
        # What `faas gateway` offers as OpenAI models.
        self.metadata["openai"] = ",".join(sorted(n for n, p in self.node.pools.items() if p.spec.openai))

    async def start(self) -> None:
        verbs: dict[str, Callable[[], dict[str, Any]]] = {
            "PING": lambda: ServicePing(id=self.id, name=protocol.SERVICE_NAME, version=self.version,
                                        metadata=self.metadata).to_dict(),
            "INFO": self.info, "STATS": self.stats_response}
        for verb, describe in verbs.items():
            for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{protocol.SERVICE_NAME}",
                            f"$SRV.{verb}.{protocol.SERVICE_NAME}.{self.id}"):
                self._subs.append(await self.nc.subscribe(subject, cb=self._answerer(describe)))
        self._subs.append(await self.nc.subscribe(self.status_subject, queue=_QUEUE_GROUP, cb=self._status))

    def _answerer(self, describe: Callable[[], dict[str, Any]]) -> Callable[[Msg], Any]:
        async def respond(msg: Msg) -> None:
            await answer(self.nc, msg.reply, json.dumps(describe(), default=str).encode(), None, self.log)

        return respond

    def info(self) -> dict[str, Any]:
        """The `$SRV.INFO` answer: the service, its metadata, its one endpoint."""
        endpoint = EndpointInfo(name="status", subject=self.status_subject, queue_group=_QUEUE_GROUP)
        return ServiceInfo(name=protocol.SERVICE_NAME, id=self.id, version=self.version,
                           description="faas runtime node: serverless LoRA functions",
                           endpoints=[endpoint], metadata=self.metadata).to_dict()

    def stats_response(self) -> dict[str, Any]:
        """The `$SRV.STATS` answer: the status endpoint's counters, with `stats()` as its data."""
        endpoint = EndpointStats(
            name="status", subject=self.status_subject, queue_group=_QUEUE_GROUP,
            num_requests=self._requests, num_errors=self._errors, processing_time=self._busy_ns,
            average_processing_time=self._busy_ns // max(1, self._requests),
            last_error=self._last_error, data=self.stats())
        return ServiceStats(id=self.id, name=protocol.SERVICE_NAME, version=self.version,
                            started=self.started.replace(tzinfo=None), endpoints=[endpoint],
                            metadata=self.metadata).to_dict()

    def stats(self) -> dict[str, Any]:
        """What `faas top` shows of this node: per function its level, sandboxes, queue and
        request statistics; the memory held; the live peers."""
        node = self.node
        host, device = node.guard.held()
        functions = {}
        for name, pool in sorted(node.pools.items()):
            state = pool.state()
            functions[name] = {"level": pool.held_level.label, "version": pool.spec.deployed,
                               "idle": state["idle"], "busy": state["busy"], "active": state["active"],
                               "starting": state["starting"], "queued": state["queued"],
                               **node.stats[name].summary()}
        return {"node": node.node_id, "functions": functions,
                "memory": {"host_bytes": host, "device_bytes": device,
                           "host_budget_bytes": node.guard.budget.host_bytes,
                           "device_budget_bytes": node.guard.budget.device_bytes},
                "peers": sorted(node.cluster.live_peers())}

    async def _status(self, msg: Msg) -> None:
        started = time.monotonic_ns()
        self._requests += 1
        if not await answer(self.nc, msg.reply, json.dumps(self.node.describe(), default=str).encode(),
                            None, self.log):
            self._errors += 1
            self._last_error = "the answer could not be sent"
        self._busy_ns += time.monotonic_ns() - started

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except NatsError as exc:
                self.log.warning("service_stop_failed", error=str(exc))
        self._subs = []
