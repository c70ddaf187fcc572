"""`faas demo`: serve the example functions on an embedded nats-server, call each one twice
(cold, then warm) through NATS and print what came back and how long it took."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from faas.bundled import SMOLLM2, default_model, faas_home, first_build, smollm2_unavailable_file
from faas.cli import format_table
from faas.client import Client
from faas.errors import FaasError
from faas.localnode import LocalNode, free_port
from faas.top import served as served_by

# One realistic event per bundled example function.
EXAMPLE_EVENTS: dict[str, dict[str, Any]] = {
    "echo": {"text": "hello from the demo"},
    "support": {"message": "My order #1042 has not arrived yet. Can you check the status?"},
    "summarize": {"text": "Maria ordered a blue jacket in March, received a red one, asked for "
                          "an exchange and is still waiting for the refund after three weeks."},
    "sql": {"question": "How many customers live in Lisbon?",
            "schema": "customers(id, name, city, country, signup_date); orders(id, customer_id, "
                      "order_date, status, total)"},
}


def _clip(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return text if len(text) <= width else text[: width - 3] + "..."


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


async def _through_the_gateway(http_url: str, served: list[str]) -> str:
    """One OpenAI chat completion through the gateway, as any OpenAI client would send it."""
    import httpx

    # The gateway learns the models from the nodes' INFO every 2 s (a 503 until it heard
    # one): a quick demo may ask before that.
    for _ in range(20):
        listing = await _get_json(http_url + "/v1/models")
        if "data" in listing:
            break
        await asyncio.sleep(0.5)
    else:
        return f"GET {http_url}/v1/models -> {_clip(listing, 200)}"
    models = [m["id"] for m in listing["data"] if m["id"] in served]
    if not models:
        return ""
    # What a chat client of the support model sends: its system prompt with the facts the
    # answer may use, then the customer's question.
    messages = [{"role": "system", "content": "You are a polite support agent for ACME. Answer the customer "
                 "in two or three sentences.\nFacts: You can reset your password from the sign-in page "
                 "with 'Forgot password'."},
                {"role": "user", "content": "Hi, I forgot my password. What can I do?"}]
    body = {"model": models[0], "messages": messages, "max_tokens": 64, "temperature": 0}
    async with httpx.AsyncClient(timeout=120) as http:
        reply = (await http.post(http_url + "/v1/chat/completions", json=body)).json()
    if "error" in reply:
        return f"POST {http_url}/v1/chat/completions -> error: {reply['error']['message']}"
    return (f"POST {http_url}/v1/chat/completions (model {models[0]!r}) -> "
            f"{_clip(reply['choices'][0]['message']['content'], 200)!r}, usage {reply['usage']}")


async def _get_json(url: str) -> Any:
    import httpx

    async with httpx.AsyncClient(timeout=30) as http:
        return (await http.get(url)).json()


async def run_demo(functions_dir: Path) -> int:
    slow = first_build()
    print("starting a node with an embedded nats-server" + (f" ({slow}: about a minute)" if slow else "") + "...")
    log_path = faas_home() / "demo-node.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # 0600: the node's log holds every function's output; functions must not read it.
    with os.fdopen(os.open(log_path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600), "wb") as log:
        # A state folder of its own: a `faas up` may be running on $FAAS_HOME/nats.
        node = LocalNode(functions_dir, stderr=log.fileno(), state_dir=faas_home() / "demo-nats",
                         extra_args=("--http", str(free_port())))
        try:
            url = node.start(ready_timeout_s=900)  # a first build takes its time
        except FaasError as err:
            print(f"error: {err.message} (node log: {log_path})")
            return 1
    print(f"node ready on {url}, OpenAI gateway on {node.http_url}/v1 (its log: {log_path})")
    model = default_model()
    unavailable = smollm2_unavailable_file()
    if model != SMOLLM2 and unavailable.is_file():
        print(f"SmolLM2 is unavailable ({unavailable.read_text().strip()}): the example functions serve "
              f"the tiny random model {model!r}, whose answers are gibberish")
    print(f"model: {model}\n")
    rows: list[tuple[Any, ...]] = [("FUNCTION", "CALL", "FOUND", "OUTPUT", "TTFT_MS", "TOTAL_MS")]
    failed = 0
    try:
        async with Client(url) as client:
            served = sorted(set().union(*(names for _, _, names in await served_by(client.nc))))
            for name in served:
                event = EXAMPLE_EVENTS.get(name, {})
                for call in ("cold", "warm"):
                    try:
                        result = await client.invoke(name, event, timeout_s=120)
                    except FaasError as err:
                        failed += 1
                        rows.append((name, call, "-", f"error {err.code}: {err.message}", "-", "-"))
                        continue
                    output = result.output
                    if isinstance(output, dict):
                        output = {k: v for k, v in output.items() if k != "token_ids"}
                    # The level the request found its sandbox at: pre-loading shows here.
                    rows.append((name, call, result.metrics.get("level") or "-", _clip(output, 120),
                                 _ms(result.metrics["ttft_ms"]), _ms(result.metrics["total_ms"])))
            openai_line = await _through_the_gateway(node.http_url, served)
    finally:
        node.stop()
    print(format_table(rows))
    if openai_line:
        print(f"\n{openai_line}")
    return 1 if failed else 0
