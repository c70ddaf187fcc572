"""This node among the others: what each node holds warm, shared through NATS.

Every node puts its warm state (per function: the level of its best idle sandbox, whether
a loaded one has room in its batch; whether the node is overloaded) under its id in the
key-value bucket `faas_nodes` every `interval_s` and soon after a change, and watches the
bucket for the others. A key not refreshed for `stale_s` (its node died or lost NATS) no
longer counts, and the bucket's TTL removes it.

Two decisions use it:
- forwarding: a request for a function that would start cold here goes to a node where it
  is loaded with room (`pick`);
- pre-loading: each function has one owner among the nodes that serve it, by rendezvous
  hashing of (function, node), and only the owner plans to pre-load it (`share`), so nodes
  do not all pre-load the same hot functions; the others forward to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any, Callable

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from faas import protocol
from faas.connection import raise_if_cancelled
from faas.logs import get_logger
from faas.streams import key_value

WarmState = Callable[[], dict[str, Any]]


def _rank(function: str, node: str) -> bytes:
    return hashlib.sha256(f"{function}\0{node}".encode()).digest()


class Cluster:
    def __init__(self, nc: NATS, node_id: str, warm_state: WarmState, interval_s: float = 2.0,
                 stale_s: float = 6.0) -> None:
        self.nc = nc
        self.node_id = node_id
        self.warm_state = warm_state
        self.interval_s = interval_s
        self.stale_s = stale_s
        self.peers: dict[str, tuple[float, dict[str, Any]]] = {}  # node -> (seen, state)
        self._kv: Any = None
        self._watcher: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self.log = get_logger(component="cluster")

    async def start(self) -> None:
        try:
            self._kv = await key_value(self.nc.jetstream(), "nodes", protocol.NODES_BUCKET, history=1,
                                       ttl=self.stale_s * 5)
            self._watcher = await self._kv.watchall()
        except (NatsError, TimeoutError) as exc:
            self.log.warning("cluster_state_unavailable", error=f"{type(exc).__name__}: {exc}",
                             hint="without JetStream nodes do not forward or share pre-loading")
            return
        await self._put()
        self._tasks = [asyncio.create_task(self._watch(), name="cluster-watch"),
                       asyncio.create_task(self._publish(), name="cluster-publish")]

    def poke(self) -> None:
        """This node's warm state changed: publish it soon."""
        self._changed.set()

    async def _publish(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._changed.clear()
            await self._put()
            await asyncio.sleep(0.2)  # a burst of changes publishes once

    async def _put(self) -> None:
        try:
            await self._kv.put(self.node_id, json.dumps(self.warm_state()).encode())
        except Exception as exc:  # a failed publish must not end the loop: peers would drop us
            self.log.warning("cluster_publish_failed", error=f"{type(exc).__name__}: {exc}")

    async def _watch(self) -> None:
        async for entry in self._watcher:
            raise_if_cancelled()
            if entry is None or entry.key == self.node_id:
                continue
            if entry.operation is not None or not entry.value:
                self.peers.pop(entry.key, None)
                continue
            try:
                state = json.loads(entry.value)
            except ValueError:
                state = None
            if isinstance(state, dict) and isinstance(state.get("functions"), dict) \
                    and all(isinstance(fn, dict) for fn in state["functions"].values()):
                self.peers[entry.key] = (time.monotonic(), state)
            else:  # whoever wrote it, it is not a node's state
                self.log.warning("peer_state_ignored", peer=entry.key[:64])

    def live_peers(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {node: state for node, (seen, state) in self.peers.items() if now - seen < self.stale_s}

    def forget(self, node: str) -> None:
        """A peer stopped answering: no more forwards to it until it publishes again."""
        if self.peers.pop(node, None) is not None:
            self.log.warning("peer_lost", peer=node)

    def pick(self, function: str, served_here: bool) -> str | None:
        """The peer to forward a request for `function` to: one where it is loaded with room
        (the least busy), or, when this node does not serve it at all, any peer that does.
        None: serve it here."""
        best: tuple[float, str] | None = None
        for node, state in self.live_peers().items():
            fn = state.get("functions", {}).get(function)
            if fn is None or state.get("overloaded"):
                continue
            if served_here and not fn.get("room"):
                continue
            key = (-1.0 if fn.get("room") else 0.0) + float(fn.get("load", 0.0)), node
            best = key if best is None or key < best else best
        return best[1] if best else None

    def share(self, function: str) -> float:
        """The part of `function`'s predicted demand this node plans pre-loading for: all of
        it when it owns the function among the live nodes serving it, none otherwise."""
        nodes = [self.node_id] + [node for node, state in self.live_peers().items()
                                  if function in state.get("functions", {}) and not state.get("overloaded")]
        return 1.0 if max(nodes, key=lambda n: _rank(function, n)) == self.node_id else 0.0

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except NatsError:
                pass
        if self._kv is not None:  # leaving: nobody should forward here any more
            try:
                await self._kv.delete(self.node_id)
            except (NatsError, TimeoutError):
                pass
