"""The base install (`pip install faas-lora`) is the SDK and the client: in a venv of its own,
built from this tree with only the base dependencies, it declares functions and calls them on
a real node without torch, and `faas up` says what it needs instead of failing on an
import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SCRIPT = '''
import asyncio, json, sys

import faas
from faas import Client, function


@function(name="hello", timeout_s=5)
def hello(event, ctx):
    return {"hi": event.get("name")}


async def main(url):
    async with Client(url) as client:
        result = await client.invoke("echo", {"q": "base"}, timeout_s=60)
    record = hello.__faas_spec__.record()
    heavy = sorted(m for m in ("torch", "transformers", "peft", "starlette") if m in sys.modules)
    print(json.dumps({"output": result.output, "record": record.name, "local": hello({"name": "x"}, None),
                      "heavy": heavy}))


asyncio.run(main(sys.argv[1]))
'''


@pytest.fixture(scope="module")
def base_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("base-install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    out = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(ROOT)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return python


def test_the_base_install_declares_and_calls_functions_without_torch(base_python, node, tmp_path):
    missing = subprocess.run([str(base_python), "-c", "import torch"], capture_output=True, timeout=60)
    assert missing.returncode != 0  # the venv really lacks the runtime's dependencies
    (tmp_path / "use.py").write_text(SCRIPT)
    out = subprocess.run([str(base_python), str(tmp_path / "use.py"), node.url], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == {"output": {"echo": {"q": "base"}, "keys": ["q"]}, "record": "hello",
                                      "local": {"hi": "x"}, "heavy": []}
    cli = subprocess.run([str(base_python), "-m", "faas.cli", "invoke", "echo", '{"q": 1}', "--nats", node.url],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and json.loads(cli.stdout)["echo"] == {"q": 1}, cli.stderr


def test_faas_up_on_the_base_install_names_the_extra_it_needs(base_python):
    out = subprocess.run([str(base_python), "-m", "faas.cli", "up"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "faas up needs the runtime" in out.stderr and "faas-lora[runtime]" in out.stderr
    assert "Traceback" not in out.stderr
