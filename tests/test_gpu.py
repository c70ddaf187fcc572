"""The CUDA path: a node on the GPU maps the backbone through CUDA IPC and still generates
exactly the reference tokens. Skipped cleanly where no CUDA GPU is present."""

from __future__ import annotations

import asyncio

import pytest
import torch

from faas import Client, HandlerError
from faas.bundled import adapter_path, model_path
from faas.localnode import LocalNode
from tests.conftest import EXAMPLES, nodes_of
from tests.reference import example_prompt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@torch.inference_mode()
def cuda_reference(adapter: str, prompt: str, max_new_tokens: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = AutoModelForCausalLM.from_pretrained(model_path()).to("cuda")
    model = PeftModel.from_pretrained(model, adapter_path(adapter)).eval()
    inputs = tokenizer(prompt, return_tensors="pt").to("cuda")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


async def serves_staged_like_the_reference(pool, request_id: str) -> None:
    """A request to `pool` (support's) finds its sandbox `staged`, finishes loading it on
    the device, and answers like the CUDA reference."""
    import time

    from runtime.sandbox.levels import Level

    event = {"message": "Where is my parcel?", "max_new_tokens": 16}
    pool.admit()
    served = await pool.serve(request_id, event, time.monotonic() + 300)
    assert served.level == Level.STAGED
    prompt = example_prompt("support", event, model_path())
    assert served.result.output["token_ids"] == cuda_reference("support", prompt, 16)


async def test_cuda_ipc_backbone_matches_reference(models, tmp_path):
    # Sandboxes under the node's uid: see the README on sandbox uids and CUDA IPC.
    with LocalNode(EXAMPLES, extra_args=("--device", "cuda", "--sandbox-uids", "off"),
                   state_dir=tmp_path) as node:
        async with Client(node.url) as client:
            for name in ("support", "sql"):
                event = {"message": "Where is my parcel?", "question": "How many users?",
                         "max_new_tokens": 16}
                result = await client.invoke(name, event, timeout_s=300)
                prompt = example_prompt(name, event, model_path())
                assert result.output["token_ids"] == cuda_reference(name, prompt, 16)
            (listing,) = await nodes_of(node)
            assert listing["backbones"][0]["backend"] == "cuda-ipc"


async def test_gpu_scribbler_is_detected_and_the_backbone_reloaded(models, tmp_path):
    """On GPU a sandbox can write the shared weights: the node notices (checksums after
    each sandbox exit), kills every sandbox on that backbone and reloads it."""
    from tests.conftest import TEST_FUNCTIONS

    with LocalNode(EXAMPLES, TEST_FUNCTIONS, state_dir=tmp_path,
                   extra_args=("--device", "cuda", "--sandbox-uids", "off")) as node:
        async with Client(node.url) as client:
            event = {"message": "Is my refund on its way?", "max_new_tokens": 12}
            before = (await client.invoke("support", event, timeout_s=300)).output["token_ids"]
            with pytest.raises(HandlerError, match="exited with code 0"):  # wrote, then left
                await client.invoke("scribble", {}, timeout_s=300)
            for _ in range(300):  # the check after its exit kills support's sandbox too
                (listing,) = await nodes_of(node)
                (support,) = [f for f in listing["functions"] if f["name"] == "support"]
                if support["idle"] == 0:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the corrupted backbone was not retired")
            after = (await client.invoke("support", event, timeout_s=300)).output["token_ids"]
            assert after == before


async def test_cuda_sandbox_prepared_to_staged_finishes_on_the_device(models):
    """The levels on the GPU: a sandbox attached through CUDA IPC with its adapter staged in
    host memory puts the adapter on the device for its first request, which then matches
    the reference; the profile records the device memory a loaded sandbox holds."""

    from bench.levels import node_parts, prepared
    from runtime.sandbox.levels import Level, Profiles

    async with node_parts(EXAMPLES, "cuda") as parts:  # the paper's path: the sandbox on the GPU
        profiles = Profiles("cuda")
        pool = parts.pool("support", profiles, engine=False)
        spec = pool.spec
        try:
            await prepared(pool, Level.STAGED)
            await serves_staged_like_the_reference(pool, "gpu-staged")
            assert profiles.of(spec.backbone).steps[Level.LOADED].device_bytes > 0
        finally:
            await pool.close()


async def test_cuda_batched_requests_and_a_stream_match_the_reference(models, tmp_path):
    """Concurrent requests share one batch on the GPU (fp32) and each still gets the tokens
    the single-request CUDA reference gives; a streamed one joins to the same text."""
    from tests.conftest import TEST_FUNCTIONS

    prompts = ["Where is my refund?", "hi", "x y z " * 10, "The parcel left on Monday.", "ok"]
    with LocalNode(EXAMPLES, TEST_FUNCTIONS, state_dir=tmp_path,
                   extra_args=("--device", "cuda", "--sandbox-uids", "off")) as node:
        async with Client(node.url) as client:
            await client.invoke("writer", {"prompt": "warm", "max_new_tokens": 2}, timeout_s=300)
            replies = await asyncio.gather(*(
                client.invoke("writer", {"prompt": p, "max_new_tokens": 24}, timeout_s=300)
                for p in prompts))
            for prompt, reply in zip(prompts, replies):
                assert reply.output["token_ids"] == cuda_reference("support", prompt, 24)
            assert max(r.metrics["batch"] for r in replies) > 1
            async with client.stream("writer", {"prompt": "hello", "max_new_tokens": 30}) as stream:
                text = "".join([chunk.delta async for chunk in stream])
            assert text == stream.result.output["text"]
            assert stream.result.output["token_ids"] == cuda_reference("support", "hello", 30)


async def test_cuda_offload_moves_the_adapter_to_host_and_back(models):
    """Offloading on the GPU: an idle loaded sandbox steps down to `staged` (adapter in host
    memory), and holds less device memory for it; its next request puts the adapter back on
    the device and matches the reference."""

    from bench.levels import node_parts, prepared
    from runtime.sandbox.levels import Level, Profiles

    async with node_parts(EXAMPLES, "cuda") as parts:
        pool = parts.pool("support", Profiles("cuda"), engine=False)
        try:
            await prepared(pool, Level.LOADED)
            [slot] = pool.idle_slots()
            loaded_device = slot.device_bytes
            pool.offload(slot, Level.STAGED)
            while slot.climb is not None:
                await asyncio.sleep(0.02)
            assert slot.level == Level.STAGED
            assert slot.device_bytes < loaded_device
            await serves_staged_like_the_reference(pool, "gpu-offloaded")
        finally:
            await pool.close()
