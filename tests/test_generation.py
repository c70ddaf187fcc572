"""Every example LoRA function, called through NATS, generates exactly the token ids that plain
transformers + peft generate in one process for the same model, adapter and prompt (fp32)."""

from __future__ import annotations

import pytest

from transformers import AutoTokenizer

from bench.accounting import processes
from faas import Client
from faas.bundled import MODEL_ENV, SMOLLM2, TINY_QWEN2, adapter_path, model_path
from faas.localnode import LocalNode
from tests.conftest import EXAMPLES
from tests.reference import decode, example_prompt, greedy_token_ids
from training.data import read
from training.evaluate import MAX_NEW_TOKENS, METRICS, evaluate
from training.functions import postprocess

CASES = [
    ("support", {"message": "Where is my refund for order 1042?", "max_new_tokens": 20}, "reply"),
    ("summarize", {"text": "The parcel left the warehouse on Monday and arrived on Friday.",
                   "max_new_tokens": 24}, "summary"),
    ("sql", {"question": "Total sales per month?", "schema": "orders(id, total, created_at)",
             "max_new_tokens": 24}, "sql"),
]


@pytest.mark.parametrize(("name", "event", "field"), CASES, ids=[c[0] for c in CASES])
async def test_example_matches_transformers_peft(client, name, event, field):
    result = await client.invoke(name, event, timeout_s=120)

    prompt = example_prompt(name, event, model_path())
    expected = greedy_token_ids(model_path(), adapter_path(name), prompt, event["max_new_tokens"])
    assert result.output["token_ids"] == expected
    text = decode(model_path(), adapter_path(name), expected)
    assert result.output[field] == postprocess(name, text)
    metrics = result.metrics
    assert metrics["tokens_out"] == len(expected)
    assert metrics["tokens_in"] == len(AutoTokenizer.from_pretrained(model_path())(prompt)["input_ids"])
    assert 0 < metrics["ttft_ms"] <= metrics["total_ms"]


async def test_adapters_change_the_output(client):
    """Same prompt, three adapters of one backbone: three different generations."""
    prompt_event = {"message": "same words", "text": "same words", "question": "same words",
                    "max_new_tokens": 12}
    outputs = {name: (await client.invoke(name, prompt_event, timeout_s=120)).output["token_ids"]
               for name in ("support", "summarize", "sql")}
    assert len({tuple(ids) for ids in outputs.values()}) == 3


async def test_second_architecture_with_tied_embeddings(client):
    """Qwen2 with tied embeddings: the backbone is not assumed to be Llama."""
    event = {"prompt": "Customer: my invoice shows the wrong price. Agent:", "max_new_tokens": 16}
    result = await client.invoke("qwen-chat", event, timeout_s=120)
    backbone, adapter = model_path(TINY_QWEN2), adapter_path("chat", TINY_QWEN2)
    expected = greedy_token_ids(backbone, adapter, event["prompt"], 16)
    assert result.output["token_ids"] == expected
    assert result.output["text"] == decode(backbone, adapter, expected)


async def test_warm_request_finds_a_loaded_sandbox(client):
    """The second call of a function reuses its sandbox, and its metrics say so."""
    event = {"message": "hello", "max_new_tokens": 4}
    await client.invoke("support", event, timeout_s=120)
    warm = await client.invoke("support", event, timeout_s=120)
    assert warm.metrics["level"] == "loaded"


# --- the real bundled model: SmolLM2-135M-Instruct with the trained adapters ---------------


async def test_real_model_answers_equal_transformers_peft_and_the_sql_parses(smollm2, tmp_path):
    """The example functions on SmolLM2, through a node: each answer is token for token what
    transformers + peft generate in fp32, and the SQL answer is a query SQLite parses."""
    with LocalNode(EXAMPLES, env={MODEL_ENV: SMOLLM2}, state_dir=tmp_path,
                   extra_args=("--sandbox-uids", "67000-67999")) as node:
        async with Client(node.url) as client:
            for task in ("sql", "summarize", "support"):
                row = read(task, "heldout")[0]
                result = await client.invoke(task, row["event"], timeout_s=300)
                backbone, adapter = str(smollm2), str(smollm2 / "adapters" / task)
                expected = greedy_token_ids(backbone, adapter, example_prompt(task, row["event"], backbone),
                                            MAX_NEW_TOKENS[task])
                assert result.output["token_ids"] == expected, task
                answer = postprocess(task, decode(backbone, adapter, expected))
                field = {"sql": "sql", "summarize": "summary", "support": "reply"}[task]
                assert result.output[field] == answer
                if task == "sql":
                    assert METRICS["sql"](row["event"], row["answer"], answer), answer
        # Every function generates in the engine: the zygote with torch never started.
        zygotes = [p.cmdline for p in processes() if b"runtime.sandbox.zygote" in p.cmdline and p.ppid == node.proc.pid]
        assert zygotes and all(b"--light" in cmdline for cmdline in zygotes)


def test_each_adapter_beats_the_bare_backbone_on_held_out_events(smollm2):
    """The committed adapters do their job: on held-out events (phrasings, stories and
    messages never trained on) more answers pass the function's metric with the adapter than
    without it."""
    results = evaluate(smollm2, smollm2 / "adapters", ["sql", "summarize", "support"], limit=16)
    for task, r in results.items():
        assert r["adapter"] > r["base"], (task, r)
        assert r["adapter"] >= 0.75, (task, r)
