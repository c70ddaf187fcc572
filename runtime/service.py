"""Each node as a NATS micro service (`nats.micro`), so standard NATS tooling sees the
runtime: `nats micro ls|info|stats faas-node`, or a request on `$SRV.PING.faas-node`
(`INFO`, `STATS`) answered once per node.

The service's metadata names the node; its one endpoint, `status` (on
`faas.node.<node>.status`), answers the node's full description (what `faas ls` shows),
and the endpoint's `data` in `$SRV.STATS` carries per function the warm level, sandboxes,
queue length, requests, errors, requests per second and TTFT / latency percentiles of the
last minute (what `faas top` shows). Invocations are not micro endpoints: functions come
and go with deploys, and micro has no endpoint removal.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from nats import micro
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.micro.request import Request

from faas import protocol
from faas.logs import get_logger

if TYPE_CHECKING:
    from runtime.node import Node


def _version() -> str:
    try:
        return version("faas-lora")
    except PackageNotFoundError:
        return "0.0.0"


class NodeService:
    def __init__(self, nc: NATS, node: Node) -> None:
        self.nc = nc
        self.node = node
        self._service: Any = None
        # nats.micro answers INFO and PING with this very dict: refresh() keeps it current.
        self.metadata: dict[str, str] = {"node": node.node_id, "device": node.config.device}
        self.refresh()
        self.log = get_logger(component="service")

    def refresh(self) -> None:
        """The functions this node serves, in its INFO/PING metadata (comma-separated)."""
        self.metadata["functions"] = ",".join(sorted(self.node.pools))
        # What `faas gateway` offers as OpenAI models.
        self.metadata["openai"] = ",".join(sorted(n for n, p in self.node.pools.items() if p.spec.get("openai")))

    async def start(self) -> None:
        node = self.node
        self._service = await micro.add_service(
            self.nc, name=protocol.SERVICE_NAME, version=_version(),
            description="faas runtime node: serverless LoRA functions",
            metadata=self.metadata,
            stats_handler=lambda _endpoint: self.stats())
        await self._service.add_endpoint(name="status", subject=protocol.node_status_subject(node.node_id),
                                         handler=self._status)

    def stats(self) -> dict[str, Any]:
        node = self.node
        host, device = node.guard.held()
        functions = {}
        for name, pool in sorted(node.pools.items()):
            state = pool.state()
            functions[name] = {"level": pool.held_level.label, "version": pool.spec.get("deployed"),
                               "idle": state["idle"], "busy": state["busy"], "active": state["active"],
                               "starting": state["starting"], "queued": state["queued"],
                               **node.stats[name].summary()}
        return {"node": node.node_id, "functions": functions,
                "memory": {"host_bytes": host, "device_bytes": device,
                           "host_budget_bytes": node.guard.budget.host_bytes,
                           "device_budget_bytes": node.guard.budget.device_bytes},
                "peers": sorted(node.cluster.live_peers())}

    async def _status(self, request: Request) -> None:
        await request.respond(json.dumps(self.node.describe(), default=str).encode())

    async def stop(self) -> None:
        if self._service is not None:
            try:
                await self._service.stop()
            except NatsError as exc:
                self.log.warning("service_stop_failed", error=str(exc))
