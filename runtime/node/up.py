"""`faas up`: embedded nats-server (unless a URL is given), discovery of the functions
folder in a subprocess, the node agent, the `ready` line, and an ordered drain on
SIGINT/SIGTERM: subscriptions, in-flight requests, sandboxes, NATS, the server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NATS

from faas.apikeys import ApiKeys
from faas.auth import Credentials, servers
from faas.bundled import faas_home
from faas.connection import connect
from faas.protocol import NODE_INBOX_PREFIX
from faas.errors import FaasError
from faas.logs import configure_logging, get_logger
from runtime.backbone.registry import detect_device
from runtime.functions.catalog import AUTO_UIDS, Catalog, load_catalog
from runtime.node.reload import Reloader
from runtime.node.agent import Node, NodeConfig
from runtime.node.natsd import EmbeddedNats

log = get_logger()


@dataclass(frozen=True)
class UpOptions:
    """What `faas up` is given: its function folders, NATS (none: an embedded server on
    `port`), the gateway beside the node, how sandboxes are isolated, and the node's own
    configuration. `node` is the one source of the node's defaults (the CLI's options
    default to it); its device, loaders' isolation and sandbox priority are settled at
    start, from `device` and what the host allows."""

    functions_dirs: tuple[Path, ...] = ()
    nats_url: str | None = None
    credentials: Credentials = field(default_factory=Credentials)
    port: int = 4222
    state_dir: Path | None = None
    http_port: int | None = None  # the OpenAI gateway beside the node
    http_host: str = NodeConfig.metrics_host  # the gateway and the metrics listen on one address
    http_api_keys: Path | None = None  # the gateway's API keys (faas/apikeys.py); None: open, loopback only
    http_adapter_backbone: Path | None = None  # what adapters loaded through the gateway adapt
    http_timeout_s: float = 120.0
    bundled_models: bool = True
    device: str = "auto"
    # When the node runs as root: discovery runs as the first uid, function i (by sorted
    # name) as first + 1 + i; AUTO_UIDS: the first range free on this host. None: sandboxes
    # keep the node's uid.
    sandbox_uids: tuple[int, int] | str | None = AUTO_UIDS
    network_isolation: bool = True
    reload: bool = False  # serve the functions folders' changes as they are saved
    node: NodeConfig = field(default_factory=NodeConfig)


async def connect_node(url: str, node_id: str, on_closed: Callable[[], Awaitable[None]],
                       credentials: dict[str, str] | None = None,
                       first_connect_s: float = 15.0) -> NATS:
    """Connect the node: reconnect forever once connected, but fail start-up with a clear
    error when the server cannot be reached at all. `on_closed` runs when the connection is
    closed for good (nats-py closes it after some server errors instead of reconnecting, e.g.
    a revoked login). Its own replies come on an inbox prefix no producer may read."""
    options = {"inbox_prefix": NODE_INBOX_PREFIX, **(credentials or {})}
    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=f"{type(exc).__name__}: {exc}")

    async def on_disconnected() -> None:
        log.info("nats_disconnected")

    async def on_reconnected() -> None:
        log.info("nats_reconnected")

    try:
        return await asyncio.wait_for(connect(
            servers(url), name=f"faas-node-{node_id}", max_reconnect_attempts=-1, reconnect_time_wait=1,
            error_cb=on_error, disconnected_cb=on_disconnected, reconnected_cb=on_reconnected,
            closed_cb=on_closed, **options),
            first_connect_s)
    except TimeoutError:
        raise FaasError(f"cannot reach NATS at {url} within {first_connect_s:.0f}s") from None


async def _start_gateway(url: str, credentials: dict[str, str], sock: socket.socket, options: UpOptions,
                         stop: asyncio.Event, api_keys: ApiKeys | None) -> asyncio.Task[None]:
    """The gateway on its own NATS connection (it is a client like any other), until `stop`."""
    from faas.client import Client
    from faas.gateway import serve_gateway

    client = Client(url, max_reconnect_attempts=-1, **{"inbox_prefix": NODE_INBOX_PREFIX, **credentials})
    await client.connect()

    async def run() -> None:
        try:
            await serve_gateway(client, sock, options.http_timeout_s, stop, api_keys=api_keys,
                                adapter_backbone=options.http_adapter_backbone)
        finally:
            await client.close()

    return asyncio.create_task(run(), name="gateway")


async def up(options: UpOptions) -> int:
    configure_logging()
    # Pin the state folder for every child: its default depends on the uid, and discovery
    # and sandboxes run under other uids than the node.
    os.environ["FAAS_HOME"] = str(faas_home().resolve())
    stop = asyncio.Event()
    lost_connection = False

    async def on_closed() -> None:
        nonlocal lost_connection
        if not stop.is_set():
            log.error("nats_connection_closed")
            lost_connection = True
            stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server: EmbeddedNats | None = None
    catalog: Catalog | None = None
    http_sock: socket.socket | None = None
    try:
        if options.http_port is not None:  # first: a port in use fails before anything starts
            from faas.gateway import bind

            api_keys = ApiKeys.load(options.http_api_keys) if options.http_api_keys else None
            http_sock = bind(options.http_host, options.http_port, api_keys)
        url = options.nats_url
        credentials = options.credentials.options()
        if url is None:
            server = EmbeddedNats(options.port, options.state_dir or faas_home() / "nats")
            await server.start()
            url = server.url
            credentials = {"user": server.node_user, "password": server.node_password}
        catalog = await load_catalog(options.functions_dirs, options.sandbox_uids,
                                     options.network_isolation, options.bundled_models,
                                     options.node.models_dirs)
        log.info("protections", **catalog.protections,
                 nats=("embedded server: nodes in account FAAS; clients without credentials "
                       "in PRODUCERS, which may only invoke, cancel, publish events and "
                       "discover nodes") if server else "external server")
        device = detect_device(options.device)
        config = replace(options.node, device=device, loader_isolation=catalog.loader_isolation,
                         sandbox=replace(options.node.sandbox,
                                         prefill_priority=device == "cpu" and os.geteuid() == 0))
        nc = await connect_node(url, config.node_id, on_closed, credentials)
        node = Node(nc, catalog, config)
        await node.start()
        gateway = None
        if http_sock is not None:
            http = f" http=http://{options.http_host}:{http_sock.getsockname()[1]}"
            gateway = await _start_gateway(url, credentials, http_sock, options, stop, api_keys)
            http_sock = None
        reloader = None
        if options.reload and options.functions_dirs:
            reloader = asyncio.create_task(Reloader(
                catalog, tuple(d.resolve() for d in options.functions_dirs), catalog.declared,
                node.serve_local, node.unserve_local).run(), name="reload")
        print(f"ready {url} functions={len(node.pools)} node={config.node_id}"
              + (http if gateway else ""), flush=True)
        await stop.wait()
        if reloader is not None:
            reloader.cancel()
            await asyncio.gather(reloader, return_exceptions=True)
        if gateway is not None:  # its streams end (or get a grace) before the node drains
            await asyncio.gather(gateway, return_exceptions=True)
        # Without a connection no reply can reach anyone: stop at once, exit non-zero, and
        # let the supervisor start a node that is connected.
        await node.drain(grace_s=0.0 if lost_connection else None)
        if not nc.is_closed:
            await nc.drain()
        log.info("node_stopped")
        return 1 if lost_connection else 0
    except (FaasError, nats.errors.Error, OSError) as err:
        log.error("node_failed", error=err.message if isinstance(err, FaasError) else str(err))
        return 1
    finally:
        if http_sock is not None:
            http_sock.close()
        if catalog is not None:
            catalog.close()
        if server is not None:
            await server.stop()
