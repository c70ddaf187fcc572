"""The `faas` command against the session node: invoke prints JSON or fails with exit 1,
ls lists the served functions."""

from __future__ import annotations

import json
import subprocess
import sys


def faas(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faas.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_invoke_prints_output_as_json(node):
    out = faas("invoke", "echo", '{"q": "hi"}', "--nats", node.url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"echo": {"q": "hi"}, "keys": ["q"]}


def test_invoke_error_exits_1_with_the_code(node):
    out = faas("invoke", "boom", '{"why": "cli"}', "--nats", node.url)
    assert out.returncode == 1
    assert "error 500: ValueError: bad things: cli" in out.stderr
    assert out.stdout == ""


def test_invoke_reads_the_event_from_stdin_or_a_file(node, tmp_path):
    piped = subprocess.run([sys.executable, "-m", "faas.cli", "invoke", "echo", "-", "--nats", node.url],
                           input='{"q": "piped"}', capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["echo"] == {"q": "piped"}
    (tmp_path / "event.json").write_text('{"q": "filed"}')
    filed = faas("invoke", "echo", f"@{tmp_path / 'event.json'}", "--nats", node.url)
    assert filed.returncode == 0 and json.loads(filed.stdout)["echo"] == {"q": "filed"}
    missing = faas("invoke", "echo", f"@{tmp_path / 'nope.json'}", "--nats", node.url)
    assert missing.returncode == 2 and "cannot read EVENT" in missing.stderr
    endless = faas("invoke", "echo", "@/dev/zero", "--nats", node.url)
    assert endless.returncode == 2 and "more than 67108864 bytes" in endless.stderr


def test_invoke_rejects_a_non_json_event(node):
    out = faas("invoke", "echo", "{not json", "--nats", node.url)
    assert out.returncode == 2 and "not JSON" in out.stderr


def test_version_is_the_installed_package_s():
    from importlib import metadata

    out = faas("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"faas {metadata.version('faas-lora')}"


def test_invoke_without_a_server_fails_cleanly():
    out = faas("invoke", "echo", "{}", "--nats", "nats://127.0.0.1:1")
    assert out.returncode == 1 and "error 503" in out.stderr


def test_ls_lists_functions(node):
    """An operator's view (it names paths): with the node's credentials from its state
    folder; a producer's login gets none."""
    out = faas("ls", "--nats", node.url, "--json", "--state-dir", str(node.state_dir))
    assert out.returncode == 0, out.stderr
    (listing,) = json.loads(out.stdout)
    names = {fn["name"] for fn in listing["functions"]}
    assert {"echo", "support", "summarize", "sql", "qwen-chat", "boom"} <= names
    table = faas("ls", "--nats", node.url, "--state-dir", str(node.state_dir))
    assert "support" in table.stdout and "IDLE" in table.stdout
    anonymous = faas("ls", "--nats", node.url, "--json", "--state-dir", "/nonexistent")
    assert json.loads(anonymous.stdout) == [] and "permissions violation" in anonymous.stderr
