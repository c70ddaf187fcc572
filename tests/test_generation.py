"""Every example LoRA function, called through NATS, generates exactly the token ids that plain
transformers + peft generate in one process for the same model, adapter and prompt (fp32)."""

from __future__ import annotations

import pytest

from faas.bundled import TINY_QWEN2, adapter_path, model_path
from runtime.loader import load_file
from tests.conftest import EXAMPLES
from tests.reference import decode, greedy_token_ids

CASES = [
    ("support", {"message": "Where is my refund for order 1042?", "max_new_tokens": 20}, "reply"),
    ("summarize", {"text": "The parcel left the warehouse on Monday and arrived on Friday.",
                   "max_words": 50, "max_new_tokens": 24}, "summary"),
    ("sql", {"question": "Total sales per month?", "schema": "orders(id, total, created_at)",
             "max_new_tokens": 24}, "sql"),
]


@pytest.mark.parametrize(("name", "event", "field"), CASES, ids=[c[0] for c in CASES])
async def test_example_matches_transformers_peft(client, name, event, field):
    module = load_file(EXAMPLES / f"{name}.py")
    result = await client.invoke(name, event, timeout_s=120)

    prompt = module.prompt_for(event)
    expected = greedy_token_ids(model_path(), adapter_path(name), prompt, event["max_new_tokens"])
    assert result.output["token_ids"] == expected
    text = decode(model_path(), adapter_path(name), expected)
    post = module.postprocess(text, event["max_words"]) if name == "summarize" else module.postprocess(text)
    assert result.output[field] == post
    metrics = result.metrics
    assert metrics["tokens_out"] == len(expected)
    assert metrics["tokens_in"] > 0
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
