"""`faas bench`: replay a workload against serving modes, one after another on the same
requests, and write results.json, PNG plots and a table.

    faas bench --workload trace --functions 12 --minutes 3 --seed 1 --modes ours --out results/

Modes so far, all through a NATS front door: `ours` (this system), `serverful` (one
always-on process with every adapter, batching across adapters), `isolated` (classic
serverless: a fresh process with its own backbone copy per instance, cold loads from
storage, keep-alive) and `fast-load` (the same with checkpoints staged in host memory).
`ray-serve` is the next step of the benchmark issue; a mode is a class with `start`,
`held_bytes`, `invoke` and `stop`, so adding one does not touch the replay or the
accounting. Not yet modelled: the shared memory capacity that makes instances wait.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import msgpack
import nats
from tqdm import tqdm

from bench.accounting import MemoryTrace, latency_summary, process_tree, pss_bytes, slo_attainment
from bench.frontdoor import answer
from bench.models import build_model, write_functions
from bench.workloads import (
    WORKLOADS,
    Request,
    WorkloadSpec,
    function_names,
    generate,
    load_trace,
    time_scale,
)
from faas import Client, FaasError, protocol
from faas.bundled import faas_home
from faas.localnode import LocalNode, free_port
from runtime.natsd import EmbeddedNats

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"


@dataclass
class Outcome:
    function: str
    at_s: float
    ttft_ms: float | None  # from the reply's metrics, as every mode measures it
    e2e_ms: float
    error: str | None = None
    level: str | None = None  # "cold" when the request waited for an instance to start


@dataclass(frozen=True)
class ModeConfig:
    """What every mode is built from: the same model, functions and platform settings."""

    model_dir: Path
    names: list[str]
    workdir: Path
    keep_alive_s: float
    capacity_gib: float


class Mode(Protocol):
    name: str
    billing: str  # "serverless" or "serverful"

    async def start(self) -> None: ...
    def held_bytes(self) -> int: ...
    async def invoke(self, request: Request) -> dict[str, Any]: ...
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
            timeout_s=300)
        return result.metrics

    async def disconnect(self) -> None:
        if self.client is not None:
            await self.client.close()


class Ours(_ThroughNats):
    """This system: one node, the functions as LoRA functions on one shared backbone."""

    name, billing = "ours", "serverless"

    def __init__(self, config: ModeConfig) -> None:
        self.functions = config.workdir / "functions-ours"
        write_functions(self.functions, config.model_dir, config.names)
        self.node = LocalNode(self.functions, state_dir=config.workdir / "nats-ours",
                              stderr=subprocess.DEVNULL,
                              extra_args=("--sandbox-uids", "65000-65999",
                                          "--sandbox-keep-alive-s", str(config.keep_alive_s),
                                          "--backbone-keep-alive-s", str(config.keep_alive_s)))

    async def start(self) -> None:
        await self.connect(await asyncio.to_thread(self.node.start))

    def held_bytes(self) -> int:
        if self.node.proc is None:
            return 0
        return pss_bytes(process_tree(self.node.proc.pid, skip=b"nats-server"))

    async def stop(self) -> None:
        await self.disconnect()
        await asyncio.to_thread(self.node.stop)


class ServingProcess(_ThroughNats):
    """A baseline that runs as one process of its own (a `bench.<module>` program) behind its
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
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, "--nats",
                                          self.server.url, *self.args],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        credentials = {"user": self.server.node_user, "password": self.server.node_password}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(credentials).encode() + b"\n")
        self.proc.stdin.close()
        if (await asyncio.to_thread(self.proc.stdout.readline)).strip() != b"ready":
            raise RuntimeError(f"the {self.name} baseline did not start (see {self.log_path})")
        await self.connect(self.server.url)

    def held_bytes(self) -> int:
        return pss_bytes(process_tree(self.proc.pid)) if self.proc else 0

    async def stop(self) -> None:
        await self.disconnect()
        if self.proc is not None:
            # A clean stop first (Ray shuts its head processes down), then nothing left.
            leftovers = process_tree(self.proc.pid)
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                pass
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
        await self.server.stop()


def serverful(config: ModeConfig) -> ServingProcess:
    """One always-on process with every adapter (bench/serverful.py), billed for its peak
    for the whole run, as provisioned capacity is."""
    return ServingProcess("serverful", "serverful", "bench.serverful",
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


class ClassicServerless(_ThroughNats):
    """Classic serverless (`isolated`): every instance is a fresh process that loads its own
    backbone copy and adapter from storage (dropped from the page cache first), serves one
    request at a time, scales out when all are busy, and is kept alive `keep_alive_s` after
    its last request. `fast-load` is the same with the checkpoints pre-staged in host memory
    (/dev/shm, counted as held for the whole run): the ServerlessLLM idea. The platform's
    front door answers on NATS like a faas node, measuring TTFT from its receive time.

    Like a platform with fixed memory, each instance reserves its size (the largest
    instance measured so far) out of the capacity; a cold start that does not fit evicts
    idle instances, least recently used first, or waits for one to become idle."""

    billing = "serverless"

    def __init__(self, config: ModeConfig, *, staged: bool) -> None:
        self.name = "fast-load" if staged else "isolated"
        self.model_dir, self.staged, self.keep_alive_s = config.model_dir, staged, config.keep_alive_s
        self.adapters = {name: config.model_dir / "adapters" / f"a{i}"
                         for i, name in enumerate(config.names)}
        self.server = EmbeddedNats(free_port(), config.workdir / f"nats-{self.name}")
        self.idle: dict[str, list[_Instance]] = {name: [] for name in config.names}
        self.live: set[_Instance] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.staged_dir: Path | None = None
        self.staged_bytes = 0
        self.capacity_bytes = int(config.capacity_gib * 2**30)
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
        function = protocol.function_from_subject(msg.subject)
        event = msgpack.unpackb(msg.data, raw=False)
        try:
            warm = bool(self.idle[function])
            instance = self.idle[function].pop() if warm else await self._cold(function)
            outcome: dict[str, Any] | BaseException = {
                **await instance.ask(event), "level": "loaded" if warm else "cold"}
            async with self.room:
                instance.idle_since = time.monotonic()
                self.idle[function].append(instance)
                self.room.notify_all()
        except Exception as exc:  # the platform answers every request it took, bugs included
            outcome = exc
        body, headers = answer(self.name, received, outcome)
        await self.front.publish(msg.reply, body, headers=headers)

    async def _reserve(self) -> None:
        """Wait until one more instance fits the capacity, evicting idle ones LRU first."""
        async with self.room:
            while self.staged_bytes + (len(self.live) + 1) * self.instance_bytes > self.capacity_bytes:
                idle = [i for pool in self.idle.values() for i in pool]
                if idle:
                    await self._drop(min(idle, key=lambda i: i.idle_since))
                    self.evictions += 1
                else:
                    await self.room.wait()

    async def _drop(self, instance: _Instance) -> None:
        self.idle[instance.function].remove(instance)
        self.live.discard(instance)
        if instance.proc.returncode is None:
            instance.proc.kill()
            await instance.proc.wait()

    async def _cold(self, function: str) -> _Instance:
        model = self.staged_dir / "model" if self.staged_dir else self.model_dir
        args = ["--model", str(model), "--adapter", str(self.adapters[function])]
        if not self.staged:
            args.append("--drop-cache")
        await self._reserve()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.instance", *args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        instance = _Instance(proc, function)
        self.live.add(instance)
        assert proc.stdout is not None
        if not await proc.stdout.readline():
            async with self.room:
                self.live.discard(instance)
                self.room.notify_all()
            raise FaasError(f"instance of {function} failed to start")
        self.instance_bytes = max(self.instance_bytes, await asyncio.to_thread(pss_bytes, [proc.pid]))
        return instance

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            async with self.room:
                for instance in [i for pool in self.idle.values() for i in pool
                                 if now - i.idle_since > self.keep_alive_s]:
                    await self._drop(instance)
                self.room.notify_all()

    def held_bytes(self) -> int:
        return pss_bytes([i.proc.pid for i in self.live if i.proc.returncode is None]) + self.staged_bytes

    async def stop(self) -> None:
        await self.disconnect()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for instance in self.live:
            if instance.proc.returncode is None:
                instance.proc.kill()
                await instance.proc.wait()
        await self.front.close()
        await self.server.stop()
        if self.staged_dir is not None:
            shutil.rmtree(self.staged_dir, ignore_errors=True)


MODES: dict[str, Callable[[ModeConfig], Mode]] = {
    "ours": Ours,
    "serverful": serverful,
    "isolated": lambda config: ClassicServerless(config, staged=False),
    "fast-load": lambda config: ClassicServerless(config, staged=True),
    "ray-serve": ray_serve,
}


async def replay(mode: Mode, requests: list[Request], sample_every_s: float = 0.5
                 ) -> tuple[list[Outcome], MemoryTrace, float]:
    """Send each request at its time; sample the mode's memory meanwhile; show progress
    (answered requests) on stderr."""
    memory = MemoryTrace()
    started = time.monotonic()
    progress = tqdm(total=len(requests), desc=f"{mode.name:>10}", unit="req", leave=True,
                    file=sys.stderr, dynamic_ncols=True)

    async def one(request: Request) -> Outcome:
        await asyncio.sleep(max(0.0, started + request.at_s - time.monotonic()))
        sent = time.monotonic()
        try:
            metrics = await mode.invoke(request)
            return Outcome(request.function, request.at_s, metrics.get("ttft_ms"),
                           (time.monotonic() - sent) * 1000, level=metrics.get("level"))
        except FaasError as err:
            return Outcome(request.function, request.at_s, None, (time.monotonic() - sent) * 1000,
                           f"{err.code}: {err.message}")
        finally:
            progress.update()

    async def sample() -> None:
        while True:
            memory.add(time.monotonic() - started, await asyncio.to_thread(mode.held_bytes))
            await asyncio.sleep(sample_every_s)

    sampler = asyncio.create_task(sample())
    try:
        outcomes = await asyncio.gather(*(one(r) for r in requests))
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        progress.close()
    duration = time.monotonic() - started
    memory.add(duration, await asyncio.to_thread(mode.held_bytes))
    return list(outcomes), memory, duration


def summarize(outcomes: list[Outcome], memory: MemoryTrace, duration_s: float, billing: str,
              slo_ms: float, price_per_gib_s: float, capacity_gib: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None]
    return {
        "requests": len(outcomes), "errors": len(outcomes) - len(ok),
        "error_samples": sorted({o.error for o in outcomes if o.error})[:5],
        "cold_starts": sum(o.level == "cold" for o in ok),
        "ttft_ms": latency_summary([o.ttft_ms for o in ok if o.ttft_ms is not None]),
        "e2e_ms": latency_summary([o.e2e_ms for o in ok]),
        "throughput_rps": len(ok) / duration_s if duration_s else 0.0,
        "slo_attainment": slo_attainment([o.ttft_ms if o.error is None else None
                                          for o in outcomes], slo_ms),
        "memory_gib_s": memory.gib_seconds(duration_s),
        "peak_memory_gib": memory.peak_bytes / 2**30,
        "over_capacity": memory.peak_bytes > capacity_gib * 2**30,
        "billing": billing,
        "cost": memory.cost(billing, price_per_gib_s, duration_s),
        "duration_s": duration_s,
        "memory_over_time": memory.samples,
        "ttft_samples_ms": sorted(o.ttft_ms for o in ok if o.ttft_ms is not None),
    }


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, mem, cost) = plt.subplots(1, 3, figsize=(15, 4))
    for name, mode in results["modes"].items():
        ttfts = mode["ttft_samples_ms"]
        if ttfts:
            cdf.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=name)
        mem.plot([t for t, _ in mode["memory_over_time"]],
                 [b / 2**30 for _, b in mode["memory_over_time"]], label=name)
    cdf.set_xscale("log")
    cdf.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF")
    mem.set(xlabel="time (s)", ylabel="held memory (GiB)", title="memory over time")
    names = list(results["modes"])
    cost.bar(names, [results["modes"][n]["cost"] for n in names])
    cost.set(title="cost", ylabel="price units")
    for axis in (cdf, mem):
        axis.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"faas bench: unknown mode(s) {', '.join(unknown)} "
                         f"(available: {', '.join(MODES)})")
    spec = WorkloadSpec(workload=args.workload, functions=args.functions,
                        duration_s=args.minutes * 60, rate_rps=args.rate_rps, seed=args.seed)
    trace = load_trace(args.trace)
    requests = generate(spec, trace)
    model_dir = build_model(faas_home() / "bench-models", args.functions)
    # Keep-alive of 10 trace-minutes, compressed like the arrivals.
    config = ModeConfig(model_dir=model_dir, names=function_names(args.functions),
                        workdir=faas_home() / "bench-paper",
                        keep_alive_s=600 * time_scale(spec, trace), capacity_gib=args.capacity_gib)
    results: dict[str, Any] = {"workload": {**asdict(spec), "requests": len(requests),
                                            "trace": str(args.trace), "slo_ms": args.slo_ms,
                                            "price_per_gib_s": args.price_per_gib_s,
                                            "keep_alive_s": config.keep_alive_s,
                                            "capacity_gib": config.capacity_gib,
                                            "model": str(model_dir), "cpus": os.cpu_count()},
                               "modes": {}}
    print(json.dumps(results["workload"]), flush=True)
    for name in modes:
        mode = MODES[name](config)
        await mode.start()
        try:
            outcomes, memory, duration = await replay(mode, requests)
        finally:
            await mode.stop()
        results["modes"][name] = summarize(outcomes, memory, duration, mode.billing,
                                           args.slo_ms, args.price_per_gib_s, args.capacity_gib)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faas bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=WORKLOADS, default="trace")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--functions", type=int, default=12)
    parser.add_argument("--minutes", type=float, default=3.0)
    # A request of the default size costs ~2.2 core-seconds here (bench model, 1 thread):
    # 0.5 rps keeps a 2-core machine about half busy, where modes differ by design, not by
    # which one drowns first.
    parser.add_argument("--rate-rps", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--modes", default="ours")
    parser.add_argument("--slo-ms", type=float, default=2500.0)
    parser.add_argument("--price-per-gib-s", type=float, default=1.0)
    parser.add_argument("--capacity-gib", type=float, default=16.0,
                        help="memory every mode may hold; instances wait for room beyond it")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "results.png")
    print(f"\n{'mode':<10} {'ttft p50':>9} {'p99':>9} {'e2e p99':>9} {'slo':>6} {'GiB*s':>9} {'cost':>9} {'errors':>6}")
    for name, m in results["modes"].items():
        print(f"{name:<10} {m['ttft_ms']['p50']:>9.1f} {m['ttft_ms']['p99']:>9.1f} "
              f"{m['e2e_ms']['p99']:>9.1f} {m['slo_attainment']:>6.2f} {m['memory_gib_s']:>9.1f} "
              f"{m['cost']:>9.1f} {m['errors']:>6}")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
