"""The serving modes `faas bench` compares, all behind a NATS front door that answers like a
faas node (same envelope, TTFT from the front door's receive time to the first token):

- `ours`: this system, one node (`faas up`) serving the functions on one shared backbone,
  their generations batched together in the node's engine; `ours-sandbox` the paper's
  path (each function generates in its own sandbox, the backbone mapped into it);
  `ours-no-preload` without predictive pre-loading (fixed keep-alives), `ours-rate` with
  the rate estimate instead of the hybrid histogram; `ours-no-batching` one request per
  sandbox at a time (`--max-batch 1`), `ours-no-window` batching without the
  contention-aware window (`--no-batch-window`);
- `serverful`: the same node and engine always on: every function loaded before the
  replay, nothing ever scaled down, billed at its peak for the whole run; what `ours` vs
  `serverful` shows is exactly what serverless adds and costs;
- `serverful-peft`: one always-on process with every adapter in one peft model, static
  batches across adapters (bench/serverful.py);
- `isolated`: classic serverless, a fresh process with its own backbone copy per instance;
- `fast-load`: the same with the checkpoints staged in host memory (ServerlessLLM);
- `ray-serve`: Ray Serve with multiplexed adapters, autoscaling from zero.

A mode is a factory from `ModeConfig` to an object with `start`, `invoke`, `held_bytes`,
`counters` and `stop` (the `Mode` protocol), so a new one does not touch the replay or the
accounting.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import msgpack
import nats

from bench.accounting import GIB, held_bytes, process_tree, pss_bytes
from bench.frontdoor import answer
from bench.models import adapters_of, write_functions
from bench.workloads import Request
from faas import Client, FaasError, FunctionNotFound, Overloaded, protocol
from faas.localnode import LocalNode, free_port
from runtime.node.natsd import EmbeddedNats
from runtime.proc.usage import gpu_memory


@dataclass(frozen=True)
class ModeConfig:
    """What every mode is built from: the same model, functions and platform settings."""

    model_dir: Path
    names: list[str]
    workdir: Path
    keep_alive_s: float
    capacity_gib: float
    # Where our node keeps backbones, and more `faas up` options for it (the baselines run
    # on the CPU).
    device: str = "cpu"
    node_args: tuple[str, ...] = ()


class Mode(Protocol):
    name: str
    billing: str  # "serverless" (pays what it holds) or "serverful" (pays its peak throughout)

    async def start(self) -> None: ...
    async def invoke(self, request: Request) -> dict[str, Any]: ...
    async def held_bytes(self) -> int: ...
    def counters(self) -> dict[str, int]: ...
    async def stop(self) -> None: ...


class _ThroughNats:
    """What every mode shares: producers call it through NATS with the faas SDK."""

    client: Client | None = None

    async def connect(self, url: str) -> None:
        self.client = Client(url)
        await self.client.connect()

    async def invoke(self, request: Request) -> dict[str, Any]:
        if self.client is None:
            raise RuntimeError("mode not started")
        result = await self.client.invoke(request.function, {
            "prompt_tokens": request.prompt_tokens, "output_tokens": request.output_tokens},
            timeout_s=300, retries=0)  # each request exactly once, in every mode
        return result.metrics

    def counters(self) -> dict[str, int]:
        return {}

    async def disconnect(self) -> None:
        if self.client is not None:
            await self.client.close()


async def _held_by_tree(pid: int | None, skip: bytes | None = None) -> int:
    if pid is None:
        return 0
    return await asyncio.to_thread(lambda: held_bytes(process_tree(pid, skip=skip)))


class Ours(_ThroughNats):
    """This system: one node, the functions as LoRA functions on one shared backbone. With
    pre-loading (the default) the plan keeps and starts what the history predicts; without
    (`--no-preload`), idle sandboxes and then the backbone stop after the keep-alive."""

    billing = "serverless"

    def __init__(self, config: ModeConfig, name: str = "ours", options: tuple[str, ...] = (),
                 engine: str = "shared") -> None:
        self.name = name
        self.names = config.names
        self.device = config.device
        self.device_baseline = 0
        self.functions = config.workdir / f"functions-{name}"
        self.state_dir = config.workdir / f"nats-{name}"
        # A fresh server (no invocation history left by an earlier run), and only this run's
        # functions.
        for left in (self.state_dir, self.functions):
            shutil.rmtree(left, ignore_errors=True)
        write_functions(self.functions, config.model_dir, config.names, engine)
        self.log = open(config.workdir / f"{name}.log", "wb")  # the node's log: what it planned
        self.node = LocalNode(self.functions, state_dir=self.state_dir, stderr=self.log.fileno(),
                              extra_args=("--sandbox-uids", "65000-65999",
                                          "--sandbox-keep-alive-s", str(config.keep_alive_s),
                                          "--backbone-keep-alive-s", str(config.keep_alive_s),
                                          "--device", config.device, *config.node_args, *options))

    async def start(self) -> None:
        if self.device != "cpu":
            self.device_baseline = (await asyncio.to_thread(gpu_memory))[1]
        await self.connect(await asyncio.to_thread(self.node.start))

    async def seed_history(self, arrivals: list[tuple[float, str]]) -> None:
        """Publish earlier invocations (Unix time, function) to the node's history stream,
        as the node's own login (producers may not write history), and wait until stored."""
        nc = await nats.connect(self.node.url, **self.node.node_credentials())
        try:
            for at, function in arrivals:
                await nc.publish(protocol.history_subject(function),
                                 protocol.history_record(at, "bench-history"))
            js = nc.jetstream()
            for _ in range(100):
                info = await js.stream_info(protocol.HISTORY_STREAM)
                if info.state.messages >= len(arrivals):
                    break
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    async def held_bytes(self) -> int:
        host = await _held_by_tree(self.node.proc.pid if self.node.proc else None, skip=b"nats-server")
        if self.device == "cpu":
            return host
        # What the GPU holds beyond its use before the mode started (the machine runs
        # nothing else; per-process figures are missing in some containers).
        used = (await asyncio.to_thread(gpu_memory))[1]
        return host + max(0, used - self.device_baseline)

    async def stop(self) -> None:
        await self.disconnect()
        await asyncio.to_thread(self.node.stop)
        self.log.close()


class ServingProcess(_ThroughNats):
    """A baseline that runs as one program of its own (`python -m bench.<module>`) behind its
    own NATS front door, on a nats-server of its own; billed by the PSS of its whole process
    tree. It gets its NATS login on stdin and prints `ready` once it serves."""

    def __init__(self, name: str, billing: str, module: str, args: list[str], workdir: Path) -> None:
        self.name, self.billing, self.module, self.args = name, billing, module, args
        self.log_path = workdir / f"{name}.log"
        self.server = EmbeddedNats(free_port(), workdir / f"nats-{name}")
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        await self.server.start()
        with open(self.log_path, "wb") as log:
            # Its own process group: whatever it starts (Ray's head processes) goes with it.
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, "--nats",
                                          self.server.url, *self.args], start_new_session=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        credentials = {"user": self.server.node_user, "password": self.server.node_password}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(credentials).encode() + b"\n")
        self.proc.stdin.close()
        if (await asyncio.to_thread(self.proc.stdout.readline)).strip() != b"ready":
            raise RuntimeError(f"the {self.name} baseline did not start (see {self.log_path})")
        await self.connect(self.server.url)

    async def held_bytes(self) -> int:
        return await _held_by_tree(self.proc.pid if self.proc else None)

    async def stop(self) -> None:
        await self.disconnect()
        if self.proc is not None:
            self.proc.terminate()  # a clean stop first: Ray shuts its head processes down
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await asyncio.to_thread(self.proc.wait)
        await self.server.stop()


class EngineServerful(Ours):
    """Our node as an always-on multi-LoRA server: every function loaded on the engine
    before the replay (those warm-up requests are not part of it), no keep-alive ever ends,
    nothing pre-loaded or offloaded, billed for its peak for the whole run."""

    billing = "serverful"

    def __init__(self, config: ModeConfig) -> None:
        forever = str(365 * 24 * 3600)
        super().__init__(config, "serverful", ("--no-preload", "--sandbox-keep-alive-s", forever,
                                               "--backbone-keep-alive-s", forever))

    async def start(self) -> None:
        await super().start()
        assert self.client is not None
        await asyncio.gather(*(self.client.invoke(name, {"prompt_tokens": 8, "output_tokens": 1},
                                                  timeout_s=300, retries=0) for name in self.names))


def serverful_peft(config: ModeConfig) -> ServingProcess:
    """One always-on process with every adapter in one peft model (bench/serverful.py),
    billed for its peak for the whole run, as provisioned capacity is."""
    return ServingProcess("serverful-peft", "serverful", "bench.serverful",
                          ["--model", str(config.model_dir), "--functions", ",".join(config.names)],
                          config.workdir)


def ray_serve(config: ModeConfig) -> ServingProcess:
    """Ray Serve (bench/rayserve.py), autoscaling from zero, billed like us for what it holds."""
    temp = config.workdir / "ray"
    temp.mkdir(parents=True, exist_ok=True)
    return ServingProcess("ray-serve", "serverless", "bench.rayserve",
                          ["--model", str(config.model_dir), "--functions", ",".join(config.names),
                           "--keep-alive-s", str(config.keep_alive_s),
                           "--capacity-gib", str(config.capacity_gib), "--temp-dir", str(temp)],
                          config.workdir)


@dataclass(eq=False)
class _Instance:
    proc: asyncio.subprocess.Process
    function: str
    idle_since: float = 0.0

    async def ask(self, event: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(event).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise FaasError(f"instance of {self.function} exited")
        return json.loads(line)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class ClassicServerless(_ThroughNats):
    """Classic serverless (`isolated`): every instance is a fresh process that loads its own
    backbone copy and adapter from storage (dropped from the page cache first), serves one
    request at a time, scales out when all are busy, and is kept alive `keep_alive_s` after
    its last request. `fast-load` is the same with the checkpoints pre-staged in host memory
    (/dev/shm, counted as held for the whole run): the ServerlessLLM idea.

    Like a platform with fixed memory, each instance reserves its size (the largest instance
    measured so far) out of the capacity. A request takes an idle instance of its function;
    else it starts one if it fits; else it evicts the least recently used idle instance of
    another function; else it waits until an instance frees up, and takes it if it is of its
    function. Every change of `idle`, `live` and `starting` happens under `room`."""

    billing = "serverless"

    def __init__(self, config: ModeConfig, *, staged: bool) -> None:
        self.name = "fast-load" if staged else "isolated"
        self.model_dir, self.staged, self.keep_alive_s = config.model_dir, staged, config.keep_alive_s
        self.adapters = adapters_of(config.model_dir, config.names)
        self.server = EmbeddedNats(free_port(), config.workdir / f"nats-{self.name}")
        self.front: nats.NATS | None = None
        self.idle: dict[str, list[_Instance]] = {name: [] for name in config.names}
        self.live: set[_Instance] = set()
        self.starting = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.staged_dir: Path | None = None
        self.staged_bytes = 0
        self.capacity_bytes = int(config.capacity_gib * GIB)
        # Until one is measured: the checkpoint plus what a Python process with torch holds.
        self.instance_bytes = sum(p.stat().st_size for p in config.model_dir.rglob("*")
                                  if p.is_file()) + 2**29
        self.room = asyncio.Condition()
        self.evictions = 0

    async def start(self) -> None:
        if self.staged:
            self.staged_dir = Path(tempfile.mkdtemp(prefix="faas-bench-staged-", dir="/dev/shm"))
            await asyncio.to_thread(shutil.copytree, self.model_dir, self.staged_dir / "model")
            self.adapters = {n: self.staged_dir / "model" / p.relative_to(self.model_dir)
                             for n, p in self.adapters.items()}
            self.staged_bytes = sum(p.stat().st_size for p in self.staged_dir.rglob("*") if p.is_file())
        await self.server.start()
        self.front = await nats.connect(self.server.url, user=self.server.node_user,
                                        password=self.server.node_password)
        await self.front.subscribe(protocol.INVOKE_WILDCARD, cb=self._on_request)
        self._own(self._reap_idle())
        await self.connect(self.server.url)

    def _own(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _on_request(self, msg: Any) -> None:
        self._own(self._handle(msg, time.monotonic()))

    async def _handle(self, msg: Any, received: float) -> None:
        outcome: dict[str, Any] | BaseException
        try:
            function = protocol.function_from_subject(msg.subject)
            if function not in self.idle:
                raise FunctionNotFound(f"no function named {function!r}")
            event = msgpack.unpackb(msg.data, raw=False)
            instance, level = await self._acquire(function)
            try:
                outcome = {**await instance.ask(event), "level": level}
            except BaseException:
                await self._retire(instance)
                raise
            async with self.room:
                instance.idle_since = time.monotonic()
                self.idle[function].append(instance)
                self.room.notify_all()
        except Exception as exc:  # the platform answers every request it took, bugs included
            outcome = exc
        body, headers = answer(self.name, received, outcome)
        assert self.front is not None
        await self.front.publish(msg.reply, body, headers=headers)

    async def _acquire(self, function: str) -> tuple[_Instance, str]:
        async with self.room:
            while True:
                if self.idle[function]:
                    return self.idle[function].pop(), "loaded"
                held = len(self.live) + self.starting
                if self.staged_bytes + (held + 1) * self.instance_bytes <= self.capacity_bytes:
                    self.starting += 1
                    break
                others = [i for pool in self.idle.values() for i in pool]
                if others:
                    victim = min(others, key=lambda i: i.idle_since)
                    self._forget(victim)
                    self.evictions += 1
                    await victim.kill()
                elif held == 0:
                    raise Overloaded(f"one instance ({self.instance_bytes / GIB:.2f} GiB) does "
                                     f"not fit the capacity of {self.capacity_bytes / GIB:.2f} GiB")
                else:
                    await self.room.wait()
        try:
            instance = await self._cold(function)
        finally:
            async with self.room:
                self.starting -= 1
                self.room.notify_all()
        return instance, "cold"

    def _forget(self, instance: _Instance) -> None:
        if instance in self.idle[instance.function]:
            self.idle[instance.function].remove(instance)
        self.live.discard(instance)

    async def _retire(self, instance: _Instance) -> None:
        """An instance that failed a request: gone, and its room with it."""
        async with self.room:
            self._forget(instance)
            self.room.notify_all()
        await instance.kill()

    async def _cold(self, function: str) -> _Instance:
        model = self.staged_dir / "model" if self.staged_dir else self.model_dir
        args = ["--model", str(model), "--adapter", str(self.adapters[function])]
        if not self.staged:
            args.append("--drop-cache")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.instance", *args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        instance = _Instance(proc, function)
        async with self.room:
            self.live.add(instance)
        assert proc.stdout is not None
        if not await proc.stdout.readline():
            await self._retire(instance)
            raise FaasError(f"instance of {function} failed to start")
        self._own(self._measure(instance))
        return instance

    async def _measure(self, instance: _Instance) -> None:
        """Its reservation is the largest instance seen (measured off the request's path)."""
        size = await asyncio.to_thread(pss_bytes, [instance.proc.pid])
        self.instance_bytes = max(self.instance_bytes, size)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            async with self.room:
                expired = [i for pool in self.idle.values() for i in pool
                           if now - i.idle_since > self.keep_alive_s]
                for instance in expired:
                    self._forget(instance)
                self.room.notify_all()
            for instance in expired:
                await instance.kill()

    async def held_bytes(self) -> int:
        pids = [i.proc.pid for i in self.live if i.proc.returncode is None]
        return await asyncio.to_thread(pss_bytes, pids) + self.staged_bytes

    def counters(self) -> dict[str, int]:
        return {"evictions": self.evictions}

    async def stop(self) -> None:
        await self.disconnect()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for instance in list(self.live):
            await instance.kill()
        if self.front is not None:
            await self.front.close()
        await self.server.stop()
        if self.staged_dir is not None:
            shutil.rmtree(self.staged_dir, ignore_errors=True)


MODES: dict[str, Callable[[ModeConfig], Mode]] = {
    "ours": Ours,
    "ours-sandbox": lambda config: Ours(config, "ours-sandbox", engine="sandbox"),
    "ours-no-preload": lambda config: Ours(config, "ours-no-preload", ("--no-preload",)),
    "ours-rate": lambda config: Ours(config, "ours-rate", ("--predictor", "rate")),
    "ours-no-batching": lambda config: Ours(config, "ours-no-batching", ("--max-batch", "1")),
    "ours-no-window": lambda config: Ours(config, "ours-no-window", ("--no-batch-window",)),
    "isolated": lambda config: ClassicServerless(config, staged=False),
    "fast-load": lambda config: ClassicServerless(config, staged=True),
    "serverful": EngineServerful,
    "serverful-peft": serverful_peft,
    "ray-serve": ray_serve,
}
