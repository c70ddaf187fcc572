"""The `serverful` baseline: one always-on process with the backbone and every adapter
loaded in one peft model (vLLM / S-LoRA style, no isolation), batching pending requests
across adapters with peft's `adapter_names=`. It answers `faas.invoke.<function>` on NATS
with the same envelope and metrics as a faas node, TTFT measured the same way: from
receiving the request to the first generated token.

    python -m bench.serverful --nats URL --model DIR --functions fn00,fn01 < credentials.json

It reads the NATS login it needs to serve (`{"user", "password"}`) from its first stdin line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass

import msgpack
import nats
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from bench.models import prompt_of
from faas import protocol
from faas.protocol import Encoding, Metrics
from runtime.engine import quiet_transformers


@dataclass
class Pending:
    msg: object
    function: str
    prompt: str
    output_tokens: int
    received: float


class _FirstToken(BaseStreamer):
    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2 and self.at is None:  # the first call carries the prompt
            self.at = time.monotonic()

    def end(self) -> None:
        pass


class Server:
    def __init__(self, model_dir: str, adapters: dict[str, str], max_batch: int) -> None:
        quiet_transformers()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        names = list(adapters)
        model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()
        self.max_batch = max_batch
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()

    @torch.inference_mode()
    def run_batch(self, batch: list[Pending]) -> tuple[list[list[int]], float | None]:
        inputs = self.tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True)
        clock = _FirstToken()
        out = self.model.generate(**inputs, adapter_names=[p.function for p in batch],
                                  max_new_tokens=max(p.output_tokens for p in batch),
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                  streamer=clock)
        width = inputs["input_ids"].shape[1]
        return [out[i, width:width + p.output_tokens].tolist() for i, p in enumerate(batch)], clock.at

    async def serve(self, nc: nats.NATS) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            token_ids, first_at = await asyncio.to_thread(self.run_batch, batch)
            for pending, ids in zip(batch, token_ids):
                metrics = Metrics(request_id=protocol.new_request_id(), node="serverful",
                                  ttft_ms=(first_at - pending.received) * 1000 if first_at else None,
                                  total_ms=(time.monotonic() - pending.received) * 1000,
                                  tokens_out=len(ids))
                body, headers = protocol.ok_reply({"tokens": len(ids)}, metrics, Encoding.MSGPACK)
                await nc.publish(pending.msg.reply, body, headers=headers)  # type: ignore[attr-defined]


async def main_async(args: argparse.Namespace) -> None:
    names = args.functions.split(",")
    adapters = {name: f"{args.model}/adapters/a{i}" for i, name in enumerate(names)}
    server = Server(args.model, adapters, args.max_batch)
    nc = await nats.connect(args.nats, **json.loads(sys.stdin.readline()))

    async def on_request(msg) -> None:
        event = msgpack.unpackb(msg.data, raw=False)
        prompt = prompt_of(int(event["prompt_tokens"]))
        server.queue.put_nowait(Pending(msg, protocol.function_from_subject(msg.subject), prompt,
                                        int(event.get("output_tokens", 1)), time.monotonic()))

    await nc.subscribe(protocol.INVOKE_WILDCARD, cb=on_request)
    await nc.flush()
    print("ready", flush=True)
    await server.serve(nc)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serverful")
    for flag in ("--nats", "--model", "--functions"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
