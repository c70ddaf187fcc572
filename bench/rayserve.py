"""The `ray-serve` baseline: what many teams deploy today. One Ray Serve deployment whose
replicas each load the backbone once and the functions' adapters on demand with
`@serve.multiplexed` (requests are routed to a replica that already has the adapter),
autoscaling from zero up to the replicas the memory capacity holds, with the settings of
Ray's documentation that make scale-up fastest (PLATFORM.md: metrics pushed every 0.5 s,
no upscale delay, a 2 s look-back) and the bench's keep-alive as the downscale delay.

A NATS front door in this (driver) process calls the deployment through a handle, so Ray
Serve's own router, queueing and autoscaler decide everything behind it. TTFT is stamped
inside the replica by the same streamer clock as a faas sandbox, from the front door's
receive time. Ray's head processes (GCS, raylet, agents) are children of this process, so
the bench bills them, as it bills our node agent.

    python -m bench.rayserve --nats URL --model DIR --functions fn00,fn01 \
        --keep-alive-s S --capacity-gib G --temp-dir DIR < credentials.json
"""

from __future__ import annotations

import os

# Read by Ray (and its Serve controller and replicas, which inherit the environment) at
# import: no auth token written under ~/.ray, and autoscaling metrics every 0.5 s instead
# of 10 s (PLATFORM.md: a request from zero replicas then costs ~5.5 s instead of 12-16 s).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import msgpack  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from bench.accounting import GIB  # noqa: E402
from bench.frontdoor import answer, open_front_door  # noqa: E402
from bench.models import adapters_of  # noqa: E402
from faas import FunctionNotFound, protocol  # noqa: E402

# Measured here (PLATFORM.md): Ray's head processes hold ~0.66 GiB with no replica, and a
# replica ~0.45 GiB besides its model.
HEAD_GIB = 0.66
REPLICA_OVERHEAD_GIB = 0.45


@serve.deployment(logging_config={"enable_access_log": False})
class LoraReplica:
    """The backbone once per replica, adapters loaded on demand (peft multi-adapter)."""

    def __init__(self, model_dir: str, adapters: dict[str, str]) -> None:
        import torch

        from runtime.sandbox.model import load_lora_model

        torch.set_num_threads(1)
        self.engine = load_lora_model(model_dir)
        self.adapters = adapters
        self.lock = asyncio.Lock()  # one model: loading and generating take turns
        self.served = 0  # a replica's first request waited for it to start: a cold start
        self.fresh: set[str] = set()  # adapters loaded for a request not yet answered

    # Every function's adapter may stay (they are a few MB each): no eviction churn.
    @serve.multiplexed(max_num_models_per_replica=1024)
    async def get_adapter(self, function: str) -> str:
        async with self.lock:
            await asyncio.to_thread(self._load_adapter, function)
            self.fresh.add(function)
        return function

    def _load_adapter(self, function: str) -> None:
        from peft import PeftModel

        if isinstance(self.engine.model, PeftModel):
            self.engine.model.load_adapter(self.adapters[function], adapter_name=function)
        else:
            self.engine.model = PeftModel.from_pretrained(
                self.engine.model, self.adapters[function], adapter_name=function).eval()
            self.engine.batcher.model = self.engine.model

    def _generate(self, function: str, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
        from bench.models import prompt_of
        from runtime.sandbox.meter import UsageMeter

        self.engine.model.set_adapter(function)
        meter = UsageMeter()
        result = self.engine.generate(prompt_of(prompt_tokens), meter, max_new_tokens=output_tokens,
                                      ignore_eos=True)
        self.served += 1
        # The levels of a faas reply: a new replica is a cold start; an adapter loaded onto a
        # warm replica (backbone in place) is "attached".
        level = "cold" if self.served == 1 else "attached" if function in self.fresh else "loaded"
        self.fresh.discard(function)
        return {"first_token_at": meter.first_token_at, "tokens": len(result.token_ids),
                "level": level}

    async def __call__(self, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
        function = await self.get_adapter(serve.get_multiplexed_model_id())
        async with self.lock:
            return await asyncio.to_thread(self._generate, function, prompt_tokens, output_tokens)


def max_replicas(capacity_gib: float, model_dir: Path) -> int:
    """As many replicas as the memory capacity holds, each with its own backbone copy."""
    model_gib = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / GIB
    return max(1, int((capacity_gib - HEAD_GIB) / (model_gib + REPLICA_OVERHEAD_GIB)))


async def main_async(args: argparse.Namespace) -> None:
    names = args.functions.split(",")
    adapters = {name: str(path) for name, path in adapters_of(args.model, names).items()}
    replicas = max_replicas(args.capacity_gib, args.model)
    ray.init(num_cpus=args.cpus, include_dashboard=False, _temp_dir=str(args.temp_dir),
             logging_level="ERROR", log_to_driver=False)
    serve.start(proxy_location="Disabled")
    app = LoraReplica.options(
        autoscaling_config={"min_replicas": 0, "initial_replicas": 0, "max_replicas": replicas,
                            "target_ongoing_requests": 1, "upscale_delay_s": 0,
                            "downscale_delay_s": args.keep_alive_s, "look_back_period_s": 2,
                            "metrics_interval_s": 0.5},
        # A replica generates one request at a time: a second one would wait inside it,
        # out of reach of the router and the autoscaler, instead of going to a free replica.
        max_ongoing_requests=1,
        # Every replica fits the CPUs Ray is given, as sandboxes share the node's cores.
        ray_actor_options={"num_cpus": args.cpus / replicas},
    ).bind(str(args.model), adapters)
    handle = serve.run(app, name="lora", route_prefix=None)
    tasks: set[asyncio.Task[None]] = set()

    async def handle_request(msg: Any, received: float) -> None:
        outcome: dict[str, Any] | BaseException
        try:
            event = msgpack.unpackb(msg.data, raw=False)
            function = protocol.function_from_subject(msg.subject)
            if function not in adapters:
                raise FunctionNotFound(f"no function named {function!r}")
            outcome = await handle.options(
                multiplexed_model_id=function).remote(int(event["prompt_tokens"]),
                                                      int(event.get("output_tokens", 1)))
        except Exception as exc:
            outcome = exc
        body, headers = answer("ray-serve", received, outcome)
        await nc.publish(msg.reply, body, headers=headers)

    async def on_request(msg: Any) -> None:
        task = asyncio.create_task(handle_request(msg, time.monotonic()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    nc = await open_front_door(args.nats, on_request)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    serve.shutdown()
    ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rayserve")
    parser.add_argument("--nats", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--functions", required=True)
    parser.add_argument("--keep-alive-s", type=float, required=True)
    parser.add_argument("--capacity-gib", type=float, required=True)
    parser.add_argument("--temp-dir", type=Path, required=True)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
