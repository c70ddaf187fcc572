"""The `serverful-peft` baseline: one always-on process with the backbone and every adapter
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import nats
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from bench.frontdoor import answer, open_front_door
from bench.models import adapters_of, prompt_of
from faas import FunctionNotFound, protocol
from runtime.models.hf import quiet_transformers


class FirstTokenClock(BaseStreamer):
    """When `generate` produced its first token (it calls put() with the prompt first, then
    with each new token)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.monotonic()

    def end(self) -> None:
        pass


@dataclass
class Pending:
    msg: object
    function: str
    prompt: str
    output_tokens: int
    received: float


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
        clock = FirstTokenClock()
        out = self.model.generate(**inputs, adapter_names=[p.function for p in batch],
                                  max_new_tokens=max(p.output_tokens for p in batch),
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                  streamer=clock)
        width = inputs["input_ids"].shape[1]
        return [out[i, width:width + p.output_tokens].tolist() for i, p in enumerate(batch)], clock.first_token_at

    async def serve(self, nc: nats.NATS) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                token_ids, first_at = await asyncio.to_thread(self.run_batch, batch)
                outcomes: list[dict | BaseException] = [
                    {"first_token_at": first_at, "tokens": len(ids)} for ids in token_ids]
            except Exception as exc:  # one bad batch fails its requests, not the server
                outcomes = [exc] * len(batch)
            for pending, outcome in zip(batch, outcomes):
                body, headers = answer("serverful-peft", pending.received, outcome)
                await nc.publish(pending.msg.reply, body, headers=headers)  # type: ignore[attr-defined]


async def main_async(args: argparse.Namespace) -> None:
    names = args.functions.split(",")
    adapters = {name: str(path) for name, path in adapters_of(Path(args.model), names).items()}
    server = Server(args.model, adapters, args.max_batch)

    nc: nats.NATS | None = None  # set before `ready`, so before any request arrives

    async def on_request(msg) -> None:
        received = time.monotonic()
        try:
            event = msgpack.unpackb(msg.data, raw=False)
            function = protocol.function_from_subject(msg.subject)
            if function not in adapters:
                raise FunctionNotFound(f"no function named {function!r}")
            pending = Pending(msg, function, prompt_of(int(event["prompt_tokens"])),
                              int(event.get("output_tokens", 1)), received)
        except Exception as exc:  # a bad request gets its error, the others their batch
            body, headers = answer("serverful-peft", received, exc)
            assert nc is not None
            await nc.publish(msg.reply, body, headers=headers)
            return
        server.queue.put_nowait(pending)

    nc = await open_front_door(args.nats, on_request)
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
