"""The gateway's API keys: `Authorization: Bearer KEY` as OpenAI clients send it; 401 without
a known key, 403 for a function the key may not call; without keys, loopback only."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from faas.localnode import free_port
from tests.conftest import second_node
from tests.test_cluster import until

LIMITED, FULL = "sk-limited-0123456789abcdef", "sk-full-0123456789abcdef0123"
OPS = "sk-ops-may-load-adapters-0123456789"


def _gateway(node, *args: str) -> subprocess.Popen[str]:
    login = node.node_credentials()
    return subprocess.Popen([sys.executable, "-m", "faas.cli", "gateway", "--nats", node.url,
                             "--user", login["user"], "--password", login["password"], *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(params=["faas gateway"])
def gateway(request, node, tmp_path, models):
    """`faas gateway` over the session's node, or (`faas up --http`) the gateway beside a
    node of its own."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "limited", "key": LIMITED, "functions": ["echo"]},
                                         {"name": "full", "key": FULL, "functions": ["*"]},
                                         {"name": "ops", "key": OPS, "functions": ["*"], "adapters": True}]}))
    port = free_port()
    if request.param == "faas up --http":
        own = second_node(tmp_path, "--http", str(port), "--http-api-keys", str(keys),
                          "--http-adapter-backbone", str(models / "tiny-llama"))
        yield f"http://127.0.0.1:{port}"
        own.stop()
        return
    proc = _gateway(node, "--port", str(port), "--api-keys", str(keys),
                    "--adapter-backbone", str(models / "tiny-llama"))
    line = proc.stdout.readline()
    assert line.startswith("gateway http://"), proc.stderr.read()
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


async def test_keys_are_required_and_bound_to_their_functions(gateway):
    async with httpx.AsyncClient(base_url=gateway, timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer sk-not-a-key-of-ours-000000"}, {"Authorization": LIMITED}):
            refused = await http.post("/v1/functions/echo", json={"a": 1}, headers=headers)
            assert refused.status_code == 401, refused.text
        limited = {"Authorization": f"Bearer {LIMITED}"}
        ok = await http.post("/v1/functions/echo", json={"a": 1}, headers=limited)
        assert ok.status_code == 200 and ok.json()["output"]["echo"] == {"a": 1}
        forbidden = await http.post("/v1/functions/boom", json={}, headers=limited)
        assert forbidden.status_code == 403 and "may not call 'boom'" in forbidden.text
        unauthorized = await http.get("/v1/models")
        assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get("/v1/models", headers=limited)).json()["data"] == []
        full = (await http.get("/v1/models", headers={"Authorization": f"Bearer {FULL}"})).json()["data"]
        assert "support" in {m["id"] for m in full}
    # The official client, as it sends keys.
    messages = [{"role": "user", "content": "Hi"}]
    reply = openai.OpenAI(base_url=f"{gateway}/v1", api_key=FULL).chat.completions.create(
        model="support", messages=messages, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{gateway}/v1", api_key=LIMITED).chat.completions.create(
            model="support", messages=messages, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway}/v1", api_key="sk-wrong-000000000000000").chat.completions.create(
            model="support", messages=messages, max_tokens=4)


@pytest.mark.parametrize("gateway", ["faas gateway", "faas up --http"], indirect=True)
async def test_vllm_s_dynamic_lora_api_loads_and_unloads_adapters_for_the_right_key(gateway, models):
    """Clients written for vLLM's `/v1/load_lora_adapter` work unchanged: the adapter is
    deployed as data on every node, then removed."""
    body = {"lora_name": "lora-dyn", "lora_path": str(models / "tiny-llama" / "adapters" / "summarize")}
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:
        for key in (LIMITED, FULL):  # keys without "adapters": true
            refused = await http.post("/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {key}"})
            assert refused.status_code == 403, refused.text
        assert (await http.post("/v1/load_lora_adapter", json=body)).status_code == 401
        ops = {"Authorization": f"Bearer {OPS}"}
        bad = await http.post("/v1/load_lora_adapter", json={**body, "lora_path": "/nonexistent"}, headers=ops)
        assert bad.status_code == 400 and "not a peft adapter folder" in bad.text
        for hostile in ([body], {**body, "lora_name": "../../etc"}, {**body, "lora_name": "x" * 100},
                        {**body, "lora_path": 42}, {"lora_path": body["lora_path"]}):
            refused = await http.post("/v1/load_lora_adapter", json=hostile, headers=ops)
            assert refused.status_code == 400, (hostile, refused.text)
        not_json = await http.post("/v1/load_lora_adapter", content=b"\x00{", headers=ops)
        assert not_json.status_code == 400
        loaded = await http.post("/v1/load_lora_adapter", json=body, headers=ops)
        assert loaded.status_code == 200 and "lora-dyn" in loaded.text

        async def listed() -> bool:
            models = await http.get("/v1/models", headers=ops)
            return "lora-dyn" in {m["id"] for m in models.json().get("data", [])}
        await until(listed, timeout_s=60, what="the loaded adapter to be a model")
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=FULL)
        reply = await client.completions.create(model="lora-dyn", prompt="Hello", max_tokens=4, temperature=0)
        assert reply.choices[0].text is not None and reply.usage.completion_tokens >= 1
        unloaded = await http.post("/v1/unload_lora_adapter", json={"lora_name": "lora-dyn"}, headers=ops)
        assert unloaded.status_code == 200

        async def gone() -> bool:
            return (await http.post("/v1/functions/lora-dyn", json={"prompt": "x"}, headers=ops)).status_code == 404
        await until(gone, timeout_s=60, what="the unloaded adapter to be gone")


def test_an_open_gateway_listens_on_loopback_only(node, tmp_path):
    proc = _gateway(node, "--port", str(free_port()), "--host", "0.0.0.0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "without API keys, open to anyone who reaches it" in err
    (tmp_path / "bad.json").write_text(json.dumps({"keys": [{"key": "short", "functions": ["*"]}]}))
    proc = _gateway(node, "--port", str(free_port()), "--api-keys", str(tmp_path / "bad.json"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "at least 16 characters" in err
