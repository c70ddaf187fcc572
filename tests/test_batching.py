"""Batched generation (continuous batching with one KV cache per sandbox), token streaming over
plain NATS, cancellation and deadlines: each checked against plain transformers + peft."""

from __future__ import annotations

import asyncio
import json
import time

import msgpack
import pytest

from faas import BadRequest, Cancelled, Client, DeadlineExceeded, Overloaded, protocol
from faas.bundled import adapter_path, model_path
from tests.conftest import EXAMPLES, nodes_of, wait_for_state
from tests.reference import decode, example_prompt, greedy_token_ids

PROMPTS = ["Where is my refund for order 1042?", "hi", "x y z " * 12,
           "The parcel left the warehouse on Monday and arrived on Friday. Summary:",
           "Customer: my invoice shows the wrong price. Agent:", "ok"]


@pytest.fixture(scope="module")
def engine(models):
    import torch

    from runtime.sandbox.model import load_lora_model

    torch.set_num_threads(1)
    engine = load_lora_model(model_path(), adapter_path("support"), max_batch=8)
    yield engine
    engine.batcher.close()


def _generate_all(engine, prompts, max_new_tokens, stagger_s=0.0, **options):
    """Submit every prompt (each `stagger_s` after the last, so later ones join a batch that is
    decoding) and wait for all."""
    from runtime.batching.batcher import GenRequest

    requests = [GenRequest(engine.batcher.encode(prompt), n, **options)
                for prompt, n in zip(prompts, max_new_tokens)]
    for request in requests:
        engine.batcher.submit(request)
        time.sleep(stagger_s)
    return [r.future.result(timeout=60) for r in requests], requests


def test_batched_greedy_equals_one_request_at_a_time(engine):
    """Rows of different lengths join a running batch between decode steps (left padding,
    masks, positions) and still get exactly the tokens transformers+peft give each alone."""
    lengths = [12, 30, 7, 25, 18, 3]
    results, _ = _generate_all(engine, PROMPTS, lengths, stagger_s=0.01)
    for prompt, n, result in zip(PROMPTS, lengths, results):
        assert result.token_ids == greedy_token_ids(model_path(), adapter_path("support"), prompt, n)
    together, requests = _generate_all(engine, PROMPTS, lengths)  # submitted at once
    assert [r.token_ids for r in together] == [r.token_ids for r in results]
    assert max(r.prefill_batch for r in requests) > 1  # prompts shared a prefill


def test_a_crowd_is_prefilled_in_turns_within_the_token_budget(engine):
    """With a prefill budget of 40 prompt tokens a turn, six prompts are prefilled a few at a
    time (the long one alone), and every row still gets its exact tokens."""
    from runtime.batching.batcher import Batcher, GenRequest

    batcher = Batcher(engine.model, engine.tokenizer, "cpu", 8, max_prefill_tokens=40)
    try:
        requests = [GenRequest(engine.batcher.encode(p), 10) for p in PROMPTS]
        for request in requests:
            batcher.submit(request)
        results = [r.future.result(timeout=60) for r in requests]
    finally:
        batcher.close()
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == greedy_token_ids(model_path(), adapter_path("support"), prompt, 10)
    for request in requests:
        share = sum(len(r.input_ids) for r in requests if r.first_token_at == request.first_token_at)
        assert share <= 40 or request.prefill_batch == 1


def _two_long_rows(engine, batcher, prompt):
    """Two rows of `prompt` + 40 tokens, decoding in `batcher` by the time this returns."""
    from runtime.batching.batcher import GenRequest

    running = [GenRequest(prompt, 40, ignore_eos=True) for _ in range(2)]
    for request in running:
        batcher.submit(request)
    while not all(r.first_token_at for r in running):
        time.sleep(0.01)
    return running


def test_the_kv_budget_holds_what_fits_and_answers_503_with_a_hint_past_the_deadline(engine):
    """A KV budget of two rows' worth: two long rows run; a request that finds no room by
    its deadline is answered 503 with when to retry, one with time left waits and gets its
    exact tokens, and one larger than the whole cache is refused at once."""
    from runtime.batching.batcher import Batcher, GenRequest

    prompt = engine.batcher.encode(PROMPTS[0])
    budget = 2 * (len(prompt) + 40)
    batcher = Batcher(engine.model, engine.tokenizer, "cpu", 8, kv_tokens=budget)
    try:
        running = _two_long_rows(engine, batcher, prompt)
        late = GenRequest(prompt, 10, deadline=time.monotonic() - 1)
        patient = GenRequest(prompt, 10, deadline=time.monotonic() + 60)
        huge = GenRequest(prompt, budget)
        for request in (late, patient, huge):
            batcher.submit(request)
        with pytest.raises(BadRequest, match="KV cache holds"):
            huge.future.result(timeout=5)
        with pytest.raises(Overloaded, match="KV cache is full") as refused:
            late.future.result(timeout=60)
        assert 0 < refused.value.retry_after_s <= 60
        assert not all(r.future.done() for r in running)  # refused while the cache was full
        assert patient.future.result(timeout=60).token_ids == greedy_token_ids(
            model_path(), adapter_path("support"), PROMPTS[0], 10)
        assert all(r.future.result().finish_reason == "length" for r in running)
    finally:
        batcher.close()


def test_a_request_waiting_for_kv_room_is_not_overtaken_by_a_smaller_one(engine):
    """Room for a third row of the running rows' size: a larger request with the earlier
    deadline waits for rows to leave, and a small one that would fit now waits behind it
    (otherwise a stream of small requests could keep a large one out for ever)."""
    from runtime.batching.batcher import Batcher, GenRequest

    prompt = engine.batcher.encode(PROMPTS[0])
    batcher = Batcher(engine.model, engine.tokenizer, "cpu", 8, kv_tokens=3 * (len(prompt) + 40))
    try:
        running = _two_long_rows(engine, batcher, prompt)
        large = GenRequest(prompt, 60, deadline=time.monotonic() + 60)
        small = GenRequest(prompt[:2], 2, ignore_eos=True, deadline=time.monotonic() + 61)
        batcher.submit(large)
        batcher.submit(small)
        assert len(small.future.result(timeout=60).token_ids) == 2
        assert large.future.result(timeout=60).token_ids == greedy_token_ids(
            model_path(), adapter_path("support"), PROMPTS[0], 60)
        assert all(r.future.done() for r in running)
        assert small.first_token_at >= large.first_token_at
    finally:
        batcher.close()


def test_sampling_is_reproducible_with_a_seed_and_varies_without(engine):
    options = {"temperature": 0.9, "top_p": 0.8}
    a, _ = _generate_all(engine, ["hello"] * 3, [20] * 3, seed=7, **options)
    assert a[0].token_ids == a[1].token_ids == a[2].token_ids
    b, _ = _generate_all(engine, ["hello"] * 3, [20] * 3, seed=None, **options)
    assert len({tuple(r.token_ids) for r in b}) > 1
    greedy = greedy_token_ids(model_path(), adapter_path("support"), "hello", 20)
    assert a[0].token_ids != greedy


def test_stop_strings_end_the_text_before_them(engine):
    (full,), _ = _generate_all(engine, ["hello"], [30])
    stop = full.text[8:11]
    (cut,), _ = _generate_all(engine, ["hello"], [30], stop=(stop,))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]


def test_streamed_deltas_join_to_the_text(engine):
    deltas: list[tuple[str, list[int]]] = []
    (full,), _ = _generate_all(engine, ["hello"], [30])
    stop = full.text[12:15]
    (result,), _ = _generate_all(engine, ["hello"], [30], stop=(stop,),
                                 on_delta=lambda text, ids: deltas.append((text, ids)))
    assert len(deltas) > 1
    assert "".join(text for text, _ in deltas) == result.text
    assert [i for _, ids in deltas for i in ids] == result.token_ids


def test_a_cancelled_row_leaves_and_the_others_finish(engine):
    from runtime.batching.batcher import GenRequest

    long = GenRequest(engine.batcher.encode("hello"), 900, ignore_eos=True)
    short = GenRequest(engine.batcher.encode("hi"), 20)
    engine.batcher.submit(long)
    engine.batcher.submit(short)
    time.sleep(0.05)
    long.cancelled.set()
    with pytest.raises(Cancelled):
        long.future.result(timeout=10)
    assert short.future.result(timeout=10).token_ids == greedy_token_ids(
        model_path(), adapter_path("support"), "hi", 20)
    assert engine.batcher.active == 0


# --- through the node ---------------------------------------------------------------------

async def test_concurrent_requests_share_a_batch_and_match_the_reference(client):
    await client.invoke("writer", {"prompt": "warm", "max_new_tokens": 2}, timeout_s=120)
    lengths = [20, 8, 16, 24, 12, 4]
    replies = await asyncio.gather(*(
        client.invoke("writer", {"prompt": p, "max_new_tokens": n}, timeout_s=120)
        for p, n in zip(PROMPTS, lengths)))
    for prompt, n, reply in zip(PROMPTS, lengths, replies):
        expected = greedy_token_ids(model_path(), adapter_path("support"), prompt, n)
        assert reply.output["token_ids"] == expected
        assert reply.output["text"] == decode(model_path(), adapter_path("support"), expected)
        assert reply.metrics["tokens_out"] == n
    assert max(r.metrics["batch"] for r in replies) > 1


async def _raw_stream(nc, event, headers=None):
    """Invoke `writer` as a plain NATS client asking for a stream: every message on the inbox."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("faas.invoke.writer", msgpack.packb(event), reply=inbox,
                     headers={protocol.HDR_STREAM: "true", **(headers or {})})
    messages = []
    while True:
        msg = await sub.next_msg(timeout=60)
        messages.append((time.monotonic(), msg))
        if msg.headers and msg.headers.get(protocol.HDR_FINAL) == "true":
            break
    await sub.unsubscribe()
    return messages


async def test_stream_chunks_arrive_before_the_final_message_and_join_to_the_text(nc):
    event = {"prompt": "Where is my order?", "max_new_tokens": 40}
    messages = await _raw_stream(nc, event)
    *chunks, (final_at, final) = messages
    assert len(chunks) > 1
    assert chunks[0][0] < final_at
    reply = msgpack.unpackb(final.data)
    deltas = [msgpack.unpackb(m.data) for _, m in chunks]
    assert "".join(d["delta"] for d in deltas) == reply["output"]["text"]
    assert [i for d in deltas for i in d["token_ids"]] == reply["output"]["token_ids"]
    assert reply["output"]["token_ids"] == greedy_token_ids(
        model_path(), adapter_path("support"), event["prompt"], 40)


async def test_sdk_stream_iterates_chunks_then_holds_the_reply(client):
    async with client.stream("writer", {"prompt": "hello", "max_new_tokens": 30,
                                        "stop": "zzzz"}, timeout_s=60) as stream:
        text = "".join([chunk.delta async for chunk in stream])
    assert stream.result is not None
    assert text == stream.result.output["text"]
    # The example function streams as well.
    async with client.stream("support", {"message": "refund please", "max_new_tokens": 8}) as s:
        assert [c async for c in s]
    assert s.result.output["token_ids"]


async def test_a_cancelled_stream_stops_generating_and_frees_its_place(client, nc, node):
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    started = time.monotonic()
    await nc.publish("faas.invoke.writer", msgpack.packb({"prompt": "hello", "max_new_tokens": 1000,
                                                          "ignore_eos": True}),
                     reply=inbox, headers={protocol.HDR_STREAM: "true",
                                           protocol.HDR_REQUEST_ID: "cancel-me-1",
                                           protocol.HDR_REQUEST_KEY: "the-callers-own-secret"})
    first = await sub.next_msg(timeout=60)
    assert protocol.HDR_FINAL not in first.headers
    await nc.publish(protocol.cancel_subject("cancel-me-1"), b"",
                     headers={protocol.HDR_REQUEST_KEY: "the-callers-own-secret"})
    while True:
        msg = await sub.next_msg(timeout=30)
        if protocol.is_final(msg.headers):
            break
    stopped_after = time.monotonic() - started
    await sub.unsubscribe()
    assert msg.headers[protocol.HDR_ERROR_CODE] == "499"
    # 1000 tokens take several seconds here: the generation stopped, it did not run out.
    alone = await client.invoke("writer", {"prompt": "hi", "max_new_tokens": 4}, timeout_s=60)
    assert alone.metrics["batch"] == 1  # nothing left of the cancelled row in the batch
    # The cancelled handler returns once its generation has stopped; then its place is free.
    await wait_for_state(node, "writer", active=0)
    assert stopped_after < 10


async def test_sdk_leaving_a_stream_early_cancels_it(client, node):
    async with client.stream("writer", {"prompt": "hello", "max_new_tokens": 1000,
                                        "ignore_eos": True}) as stream:
        async for _ in stream:
            break
    assert stream.result is None
    await wait_for_state(node, "writer", active=0)  # the node heard the cancel, the row stopped


async def test_a_request_past_its_deadline_gets_504_and_never_runs(client, nc):
    before = (await client.invoke("counter", {})).output["calls"]
    past = str(int((time.time() - 5) * 1000))
    msg = await nc.request("faas.invoke.counter", b"{}", timeout=10,
                           headers={protocol.HDR_DEADLINE_MS: past, protocol.HDR_STREAM: "true"})
    assert msg.headers[protocol.HDR_ERROR_CODE] == "504"
    assert msg.headers[protocol.HDR_FINAL] == "true"  # a streaming caller's last message too
    assert "deadline passed" in json.loads(msg.data)["error"]["message"]
    after = (await client.invoke("counter", {})).output["calls"]
    assert after == before + 1  # the handler never ran for the late one
    future = str(int((time.time() + 30) * 1000))
    msg = await nc.request("faas.invoke.counter", b"{}", timeout=10,
                           headers={protocol.HDR_DEADLINE_MS: future})
    assert json.loads(msg.data)["output"]["calls"] == after + 1


async def test_a_second_request_with_an_id_in_flight_is_refused(client, node):
    first = asyncio.create_task(client.invoke(
        "writer", {"prompt": "hello", "max_new_tokens": 1000, "ignore_eos": True},
        timeout_s=60, request_id="same-id-1"))
    while not [f for f in (await nodes_of(node))[0]["functions"]
               if f["name"] == "writer" and f["active"]]:
        await asyncio.sleep(0.02)
    async with Client(node.url) as other:  # another caller: the SDK refuses its own duplicates
        with pytest.raises(BadRequest, match="already in flight"):
            await other.invoke("writer", {"prompt": "hi"}, timeout_s=60, request_id="same-id-1")
    assert len((await first).output["token_ids"]) == 1000


async def test_budget_running_out_mid_generation_gets_504_and_the_batch_goes_on(client):
    await client.invoke("writer", {"prompt": "warm", "max_new_tokens": 2}, timeout_s=60)
    slow = asyncio.create_task(client.invoke(
        "writer", {"prompt": "hello", "max_new_tokens": 1000, "ignore_eos": True}, timeout_s=0.5))
    other = asyncio.create_task(client.invoke(
        "writer", {"prompt": "hi", "max_new_tokens": 40}, timeout_s=60))
    with pytest.raises(DeadlineExceeded, match="in the handler"):
        await slow
    reply = await other
    assert reply.output["token_ids"] == greedy_token_ids(model_path(), adapter_path("support"), "hi", 40)


async def test_offloading_under_a_small_memory_budget_keeps_serving_correctly(models, tmp_path):
    """Room for the backbone and one loaded sandbox of the paper's path only: each new
    function's sandbox offloads the idle one before it, every answer still equals the
    reference, and a request that finds every byte serving gets a 503 with a retry hint
    instead of the node failing."""
    from faas import Client, Overloaded
    from tests.conftest import second_node

    node = second_node(tmp_path, "--no-preload", "--memory-budget-gib", "0.06")
    functions = [("writer-sandbox", "support"), ("writer-sandbox-summarize", "summarize"),
                 ("writer-sandbox-sql", "sql")]
    try:
        async with Client(node.url) as client:
            for _ in range(2):
                for name, adapter in functions:
                    reply = await client.invoke(name, {"prompt": "the parcel", "max_new_tokens": 8}, timeout_s=120)
                    assert reply.output["token_ids"] == greedy_token_ids(
                        model_path(), adapter_path(adapter), "the parcel", 8)
                    [listing] = await nodes_of(node)
                    held = [f["name"] for f in listing["functions"] if f["levels"]]
                    assert held == [name]  # the others were offloaded for it
            assert listing["memory"]["offloaded"] >= 5
            long = asyncio.create_task(client.invoke(
                "writer-sandbox-sql", {"prompt": "hello", "max_new_tokens": 1000, "ignore_eos": True},
                timeout_s=60))
            while not [f for f in (await nodes_of(node))[0]["functions"]
                       if f["name"] == "writer-sandbox-sql" and f["active"]]:
                await asyncio.sleep(0.05)
            with pytest.raises(Overloaded, match="no memory") as refused:
                await client.invoke("writer-sandbox", {"prompt": "hi"}, timeout_s=30)
            assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
            assert len((await long).output["token_ids"]) == 1000
            await client.invoke("writer-sandbox", {"prompt": "hi", "max_new_tokens": 2}, timeout_s=60)
    finally:
        node.stop()


@pytest.mark.parametrize("path", ["engine", "sandbox"])
async def test_a_sandbox_offloaded_to_staged_comes_back_and_matches(models, path):
    """The step down offloading takes on a GPU (adapter off the device, kept in host memory;
    on the engine path, off the engine's model), here on the CPU: the sandbox is `staged`
    after it, and its next request reloads the adapter and answers exactly like
    transformers + peft."""
    from bench.levels import node_parts, prepared
    from runtime.sandbox.levels import Level

    async with node_parts(EXAMPLES, "cpu") as parts:
        pool = parts.pool("summarize", engine=path == "engine")
        try:
            await prepared(pool, Level.LOADED)
            [slot] = pool.idle_slots()
            pool.offload(slot, Level.STAGED)
            while slot.climb is not None:
                await asyncio.sleep(0.02)
            assert pool.state()["levels"] == ["staged"]
            event = {"text": "The parcel arrived on Friday.", "max_words": 9, "max_new_tokens": 12}
            pool.admit()
            served = await pool.serve("offloaded", event, time.monotonic() + 120)
            assert served.level == Level.STAGED
            prompt = example_prompt("summarize", event, model_path())
            assert served.result.output["token_ids"] == greedy_token_ids(
                model_path(), adapter_path("summarize"), prompt, 12)
            assert pool.state()["levels"] == ["loaded"]
        finally:
            await pool.close()
