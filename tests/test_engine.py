"""The generation engine: one process per backbone batching every function's generations,
each row with its own adapter; sandboxes reach it only through the connection the node
handed them. Rows are checked against plain transformers + peft, one adapter at a time."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from bench.accounting import processes
from faas.bundled import TINY_QWEN2, adapter_path, model_path
from faas.errors import BadRequest, Cancelled, FaasError, HandlerError, Overloaded
from runtime.backbone.registry import BackboneRegistry
from runtime.sandbox.engine_client import EngineConnection
from runtime.engine.registry import EngineRegistry
from runtime.engine.server import CHUNK_TOKENS
from runtime.sandbox.meter import UsageMeter
from tests import reference
from tests.conftest import nodes_of

PROMPTS = {"sql": "How many orders did customer 7 place last month?",
           "support": "Where is my refund for order 1042?",
           "summarize": "x y z " * 12}


@pytest.fixture
async def engines(models):
    backbones = BackboneRegistry(keep_alive_s=5)
    registry = EngineRegistry(backbones, threads=2, keep_alive_s=5)
    yield registry
    await registry.close()
    await backbones.close()


async def connected(engine, function: str, adapter: str, max_batch: int = 8) -> EngineConnection:
    conn = EngineConnection(await engine.connect(function, max_batch, 2.0))
    await asyncio.to_thread(conn.stage, adapter)
    await asyncio.to_thread(conn.load)
    return conn


async def test_every_row_of_a_mixed_batch_equals_its_adapter_alone(engines):
    backbone = model_path()
    engine = await engines.acquire(backbone)
    conns = {name: await connected(engine, name, adapter_path(name)) for name in PROMPTS}
    long_meter = UsageMeter()
    # (function, prompt, options): greedy, sampled with seeds, a stop string, lengths apart,
    # and a prompt longer than a prefill chunk (prefilled over several turns).
    long_prompt = "order refund delivery " * 120
    cases = [
        ("sql", PROMPTS["sql"], {"max_new_tokens": 12}),
        ("support", PROMPTS["support"], {"max_new_tokens": 20, "temperature": 0.8, "top_p": 0.9, "seed": 7,
                                         "ignore_eos": True}),
        ("summarize", PROMPTS["summarize"], {"max_new_tokens": 16, "temperature": 1.2, "seed": 3,
                                             "ignore_eos": True}),
        ("support", PROMPTS["support"], {"max_new_tokens": 9}),
        ("sql", PROMPTS["sql"], {"max_new_tokens": 24, "stop": ("e",)}),
        ("summarize", long_prompt, {"max_new_tokens": 10}),
    ]
    assert len(reference._load(backbone, adapter_path("sql"))[0](long_prompt)["input_ids"]) > CHUNK_TOKENS

    def run(name: str, prompt: str, options: dict):
        return conns[name].generate(prompt, UsageMeter(), **options)

    async def cancel_mid_way():
        await asyncio.sleep(0.3)
        long_meter.cancelled.set()

    outcomes = await asyncio.gather(
        *(asyncio.to_thread(run, *case) for case in cases),
        asyncio.to_thread(conns["summarize"].generate, PROMPTS["summarize"], long_meter,
                          max_new_tokens=400, ignore_eos=True),
        cancel_mid_way(), return_exceptions=True)
    assert isinstance(outcomes[len(cases)], Cancelled)  # the cancelled row left; the others went on
    for (name, prompt, options), generation in zip(cases, outcomes):
        assert not isinstance(generation, BaseException), generation
        adapter = adapter_path(name)
        if options.get("temperature"):
            expected = reference.sampled_token_ids(backbone, adapter, prompt, options["max_new_tokens"],
                                                   options["temperature"], options.get("top_p", 1.0), options["seed"])
            assert generation.token_ids == expected, name
        elif options.get("stop"):
            ids = reference.greedy_token_ids(backbone, adapter, prompt, options["max_new_tokens"])
            text = reference.decode(backbone, adapter, ids)
            assert generation.text == text[:text.index("e")] and generation.finish_reason == "stop"
        else:
            assert generation.token_ids == reference.greedy_token_ids(
                backbone, adapter, prompt, options["max_new_tokens"]), name
        assert generation.prompt_tokens == len(reference._load(backbone, adapter)[0](prompt)["input_ids"])
    engines.release(engine)


async def test_the_engine_refuses_what_does_not_fit_or_is_not_an_adapter(engines, tmp_path):
    engine = await engines.acquire(model_path())
    conn = await connected(engine, "sql", adapter_path("sql"), max_batch=2)
    with pytest.raises(BadRequest, match="exceeds the model's context"):
        await asyncio.to_thread(conn.generate, "hi", UsageMeter(), max_new_tokens=10**6)
    # An adapter of another base model: shapes that do not fit this backbone.
    other = EngineConnection(await engine.connect("qwen-chat", 2, 2.0))
    with pytest.raises(BadRequest, match="does not fit"):
        await asyncio.to_thread(other.stage, adapter_path("chat", TINY_QWEN2))
    # A connection loads only the adapter it staged itself.
    bare = EngineConnection(await engine.connect("bare", 2, 2.0))
    with pytest.raises(FaasError, match="stage the adapter first"):
        await asyncio.to_thread(bare.load)
    assert (await asyncio.to_thread(conn.generate, "hi", UsageMeter(), max_new_tokens=3)).token_ids
    engines.release(engine)


async def test_a_full_kv_cache_answers_503_with_a_retry_hint_and_the_running_rows_go_on(models):
    """An engine whose KV cache holds one long row: another function's request that finds
    no room within its TTFT SLO gets a 503 saying when to retry; the running row finishes."""
    import threading

    from transformers import AutoModelForCausalLM

    from runtime.engine.server import kv_bytes_per_token

    prompt_tokens = len(reference._load(model_path(), adapter_path("sql"))[0](PROMPTS["sql"])["input_ids"])
    budget = prompt_tokens + 600  # tokens: one row of 560 new ones, not two
    per_token = kv_bytes_per_token(AutoModelForCausalLM.from_pretrained(model_path()))
    backbones = BackboneRegistry(keep_alive_s=5)
    registry = EngineRegistry(backbones, threads=2, keep_alive_s=5, kv_bytes=budget * per_token)
    try:
        engine = await registry.acquire(model_path())
        long = await connected(engine, "summarize", adapter_path("summarize"))
        short = EngineConnection(await engine.connect("sql", 8, 0.3))  # a 0.3 s TTFT SLO
        await asyncio.to_thread(short.stage, adapter_path("sql"))
        await asyncio.to_thread(short.load)
        started = threading.Event()
        running = asyncio.ensure_future(asyncio.to_thread(
            long.generate, PROMPTS["sql"], UsageMeter(), max_new_tokens=560, ignore_eos=True,
            on_first=started.set))
        assert await asyncio.to_thread(started.wait, 60)
        with pytest.raises(Overloaded, match="KV cache is full") as refused:
            await asyncio.to_thread(short.generate, PROMPTS["sql"], UsageMeter(), max_new_tokens=100)
        assert not running.done()
        assert 0 < refused.value.retry_after_s <= 60
        with pytest.raises(BadRequest, match="KV cache holds"):
            await asyncio.to_thread(short.generate, PROMPTS["sql"], UsageMeter(), max_new_tokens=601)
        assert len((await running).token_ids) == 560
        generation = await asyncio.to_thread(short.generate, PROMPTS["sql"], UsageMeter(), max_new_tokens=8)
        assert generation.token_ids == reference.greedy_token_ids(
            model_path(), adapter_path("sql"), PROMPTS["sql"], 8)
        registry.release(engine)
    finally:
        await registry.close()
        await backbones.close()


async def test_engine_path_sandboxes_hold_no_torch_and_no_weights(client):
    out = (await client.invoke("lookout", {}, timeout_s=120)).output
    assert out == {"torch": False, "backbone_fds": 0, "backbone_mappings": 0, "text": out["text"]}


async def test_a_forging_flooding_function_is_refused_and_changes_nobody_else(client):
    event = {"prompt": PROMPTS["support"], "max_new_tokens": 24, "ignore_eos": True}
    expected = reference.greedy_token_ids(model_path(), adapter_path("support"), event["prompt"], 24)
    forged, honest = await asyncio.gather(client.invoke("forger", {}, timeout_s=120),
                                          client.invoke("writer", event, timeout_s=120))
    out = forged.output
    for attempt in ("forge_adapter", "forge_function", "stage_variant", "huge_max_new_tokens", "bad_option",
                    "bad_chat"):
        assert out[attempt].startswith("refused 400"), (attempt, out[attempt])
    assert out["restage_other_adapter"].startswith("refused 409")
    assert out["flood_refused"] >= 1 and out["flood_served"] >= 4
    assert out["flood_refused"] + out["flood_served"] == 12
    assert honest.output["token_ids"] == expected
    # Garbage on its connection: the engine cuts that sandbox off (its generations answer
    # 503); the sandbox is replaced and the function serves again, the others never stopped.
    cut = (await client.invoke("forger", {"garbage": True}, timeout_s=120)).output
    assert cut["after_garbage"].startswith("refused 503")
    assert (await client.invoke("writer", event, timeout_s=120)).output["token_ids"] == expected
    again = (await client.invoke("forger", {}, timeout_s=120)).output
    assert again["forge_adapter"].startswith("refused 400")


async def engine_pid(node) -> int:
    """The node's engine of the tiny Llama (its outer process: the one in a PID namespace of
    its own dies with it), as `faas ls` lists it."""
    (listing,) = await nodes_of(node)
    (pid,) = [e["pid"] for e in listing["engines"] if e["model"] == model_path()]
    assert any(p.pid == pid and b"runtime.engine.server" in p.cmdline for p in processes())
    return pid


async def test_a_crashing_sandbox_leaves_the_engine_and_the_others_untouched(client, node):
    event = {"prompt": PROMPTS["support"], "max_new_tokens": 40, "ignore_eos": True}
    expected = reference.greedy_token_ids(model_path(), adapter_path("support"), event["prompt"], 40)
    await client.invoke("writer", {**event, "max_new_tokens": 1}, timeout_s=120)
    engine = await engine_pid(node)
    crash, honest = await asyncio.gather(client.invoke("lookout", {"crash": True}, timeout_s=120),
                                         client.invoke("writer", event, timeout_s=120),
                                         return_exceptions=True)
    assert isinstance(crash, HandlerError) and "exited with code 3" in str(crash)
    assert honest.output["token_ids"] == expected
    assert await engine_pid(node) == engine


async def test_a_killed_engine_answers_in_flight_with_503_and_a_fresh_one_serves_next(client, node):
    event = {"prompt": PROMPTS["support"], "max_new_tokens": 800, "ignore_eos": True}
    await client.invoke("writer", {**event, "max_new_tokens": 1}, timeout_s=120)
    engine = await engine_pid(node)
    running = asyncio.create_task(client.invoke("writer", event, timeout_s=120, retries=0))
    while not [f for n in await nodes_of(node) for f in n["functions"] if f["name"] == "writer" and f["active"]]:
        await asyncio.sleep(0.02)  # killed mid-generation (800 tokens take seconds here)
    os.kill(engine, signal.SIGKILL)
    with pytest.raises(Overloaded, match="engine stopped"):
        await running
    short = {**event, "max_new_tokens": 8}
    expected = reference.greedy_token_ids(model_path(), adapter_path("support"), short["prompt"], 8)
    assert (await client.invoke("writer", short, timeout_s=120)).output["token_ids"] == expected
    assert await engine_pid(node) != engine


async def test_the_sandbox_path_and_the_engine_give_the_reference_tokens(client):
    event = {"prompt": PROMPTS["support"], "max_new_tokens": 16}
    expected = reference.greedy_token_ids(model_path(), adapter_path("support"), event["prompt"], 16)
    engine, own = await asyncio.gather(client.invoke("writer", event, timeout_s=120),
                                       client.invoke("writer-sandbox", event, timeout_s=120))
    assert engine.output["token_ids"] == own.output["token_ids"] == expected
