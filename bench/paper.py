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
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import nats

from bench.accounting import MemoryTrace, latency_summary, process_tree, pss_bytes, slo_attainment
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
from faas.protocol import Encoding, Metrics
from runtime.natsd import EmbeddedNats

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"


@dataclass
class Outcome:
    function: str
    at_s: float
    ttft_ms: float | None  # from the reply's metrics, as every mode measures it
    e2e_ms: float
    error: str | None = None


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

    def __init__(self, model_dir: Path, names: list[str], workdir: Path) -> None:
        self.functions = workdir / "functions-ours"
        write_functions(self.functions, model_dir, names)
        self.node = LocalNode(self.functions, state_dir=workdir / "nats-ours",
                              stderr=subprocess.DEVNULL,
                              extra_args=("--sandbox-uids", "65000-65999"))

    async def start(self) -> None:
        await self.connect(await asyncio.to_thread(self.node.start))

    def held_bytes(self) -> int:
        if self.node.proc is None:
            return 0
        return pss_bytes(process_tree(self.node.proc.pid, skip=b"nats-server"))

    async def stop(self) -> None:
        await self.disconnect()
        await asyncio.to_thread(self.node.stop)


class Serverful(_ThroughNats):
    """One always-on process with every adapter (bench/serverful.py), billed for its peak
    for the whole run, as provisioned capacity is."""

    name, billing = "serverful", "serverful"

    def __init__(self, model_dir: Path, names: list[str], workdir: Path) -> None:
        self.model_dir, self.names = model_dir, names
        self.server = EmbeddedNats(free_port(), workdir / "nats-serverful")
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        await self.server.start()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.serverful", "--nats", self.server.url,
             "--model", str(self.model_dir), "--functions", ",".join(self.names)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        credentials = {"user": self.server.node_user, "password": self.server.node_password}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(credentials).encode() + b"\n")
        self.proc.stdin.close()
        if (await asyncio.to_thread(self.proc.stdout.readline)).strip() != b"ready":
            raise RuntimeError("the serverful baseline did not start")
        await self.connect(self.server.url)

    def held_bytes(self) -> int:
        return pss_bytes([self.proc.pid]) if self.proc else 0

    async def stop(self) -> None:
        await self.disconnect()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        await self.server.stop()


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
    front door answers on NATS like a faas node, measuring TTFT from its receive time."""

    billing = "serverless"

    def __init__(self, model_dir: Path, names: list[str], workdir: Path, *, staged: bool,
                 keep_alive_s: float) -> None:
        self.name = "fast-load" if staged else "isolated"
        self.model_dir, self.staged, self.keep_alive_s = model_dir, staged, keep_alive_s
        self.adapters = {name: model_dir / "adapters" / f"a{i}" for i, name in enumerate(names)}
        self.server = EmbeddedNats(free_port(), workdir / f"nats-{self.name}")
        self.idle: dict[str, list[_Instance]] = {name: [] for name in names}
        self.live: set[_Instance] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.staged_dir: Path | None = None
        self.staged_bytes = 0

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
        request_id = protocol.new_request_id()
        try:
            instance = self.idle[function].pop() if self.idle[function] else await self._cold(function)
            answer = await instance.ask(event)
            instance.idle_since = time.monotonic()
            self.idle[function].append(instance)
            metrics = Metrics(request_id=request_id, node=self.name,
                              ttft_ms=(answer["first_token_at"] - received) * 1000,
                              total_ms=(time.monotonic() - received) * 1000,
                              tokens_out=answer["tokens"])
            body, headers = protocol.ok_reply({"tokens": answer["tokens"]}, metrics, Encoding.MSGPACK)
        except Exception as exc:  # the platform answers every request it took, bugs included
            body, headers = protocol.error_reply(FaasError(f"{type(exc).__name__}: {exc}"),
                                                 Encoding.MSGPACK, request_id)
        await self.front.publish(msg.reply, body, headers=headers)

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
        self.live.add(instance)
        assert proc.stdout is not None
        if not await proc.stdout.readline():
            raise FaasError(f"instance of {function} failed to start")
        return instance

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for idle in self.idle.values():
                for instance in [i for i in idle if now - i.idle_since > self.keep_alive_s]:
                    idle.remove(instance)
                    self.live.discard(instance)
                    instance.proc.kill()
                    await instance.proc.wait()

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


MODES: dict[str, Any] = {
    "ours": Ours,
    "serverful": Serverful,
    "isolated": lambda m, n, w, keep_alive_s: ClassicServerless(m, n, w, staged=False,
                                                                keep_alive_s=keep_alive_s),
    "fast-load": lambda m, n, w, keep_alive_s: ClassicServerless(m, n, w, staged=True,
                                                                 keep_alive_s=keep_alive_s),
}


async def replay(mode: Mode, requests: list[Request], sample_every_s: float = 0.5
                 ) -> tuple[list[Outcome], MemoryTrace, float]:
    """Send each request at its time; sample the mode's memory meanwhile."""
    memory = MemoryTrace()
    started = time.monotonic()

    async def one(request: Request) -> Outcome:
        await asyncio.sleep(max(0.0, started + request.at_s - time.monotonic()))
        sent = time.monotonic()
        try:
            metrics = await mode.invoke(request)
            return Outcome(request.function, request.at_s, metrics.get("ttft_ms"),
                           (time.monotonic() - sent) * 1000)
        except FaasError as err:
            return Outcome(request.function, request.at_s, None, (time.monotonic() - sent) * 1000,
                           f"{err.code}: {err.message}")

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
    duration = time.monotonic() - started
    memory.add(duration, await asyncio.to_thread(mode.held_bytes))
    return list(outcomes), memory, duration


def summarize(outcomes: list[Outcome], memory: MemoryTrace, duration_s: float, billing: str,
              slo_ms: float, price_per_gib_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None]
    return {
        "requests": len(outcomes), "errors": len(outcomes) - len(ok),
        "ttft_ms": latency_summary([o.ttft_ms for o in ok if o.ttft_ms is not None]),
        "e2e_ms": latency_summary([o.e2e_ms for o in ok]),
        "throughput_rps": len(ok) / duration_s if duration_s else 0.0,
        "slo_attainment": slo_attainment([o.ttft_ms if o.error is None else None
                                          for o in outcomes], slo_ms),
        "memory_gib_s": memory.gib_seconds(duration_s),
        "peak_memory_gib": memory.peak_bytes / 2**30,
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
    spec = WorkloadSpec(workload=args.workload, functions=args.functions,
                        duration_s=args.minutes * 60, rate_rps=args.rate_rps, seed=args.seed)
    trace = load_trace(args.trace)
    requests = generate(spec, trace)
    # Keep-alive of 10 trace-minutes, compressed like the arrivals.
    keep_alive_s = 600 * time_scale(spec, trace)
    names = function_names(args.functions)
    workdir = faas_home() / "bench-paper"
    model_dir = build_model(faas_home() / "bench-models", args.functions)
    results: dict[str, Any] = {"workload": {**asdict(spec), "requests": len(requests),
                                            "trace": str(args.trace), "slo_ms": args.slo_ms,
                                            "price_per_gib_s": args.price_per_gib_s,
                                            "keep_alive_s": keep_alive_s,
                                            "model": str(model_dir)}, "modes": {}}
    print(json.dumps(results["workload"]), flush=True)
    for name in args.modes.split(","):
        if name not in MODES:
            raise SystemExit(f"faas bench: mode {name!r} is not implemented yet "
                             f"(implemented: {', '.join(MODES)})")
        if name in ("isolated", "fast-load"):
            mode = MODES[name](model_dir, names, workdir, keep_alive_s=keep_alive_s)
        else:
            mode = MODES[name](model_dir, names, workdir)
        await mode.start()
        try:
            outcomes, memory, duration = await replay(mode, requests)
        finally:
            await mode.stop()
        results["modes"][name] = summarize(outcomes, memory, duration, mode.billing,
                                           args.slo_ms, args.price_per_gib_s)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faas bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=WORKLOADS, default="trace")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--functions", type=int, default=12)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate-rps", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--modes", default="ours")
    parser.add_argument("--slo-ms", type=float, default=2500.0)
    parser.add_argument("--price-per-gib-s", type=float, default=1.0)
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
