"""Settings and secrets per function, and the network for one function only: each reaches
its own function's sandboxes and no other process (not other functions, not discovery, not
the node's log, not a producer)."""

from __future__ import annotations

import os
import subprocess
import sys

import nats
import pytest

from faas import Client, HandlerError
from faas.localnode import LocalNode

SECRET = "s3cr3t-value-for-the-test"

FUNCTIONS = '''
import os

from faas import function

def _seen():
    return {"mode": os.environ.get("MODE"), "key": os.environ.get("API_KEY"),
            "net": sorted(line.split(":")[0].strip() for line in open("/proc/self/net/dev").readlines()[2:])}

@function(name="keeper", env={"MODE": "strict"}, secrets=["API_KEY"])
def keeper(event, ctx):
    return _seen()

@function(name="other")
def other(event, ctx):
    return _seen()

@function(name="online", network=True)
def online(event, ctx):
    return _seen()

@function(name="needs", secrets=["NOT_SET_ANYWHERE"])
def needs(event, ctx):
    return {}
'''


def _holders(value: str) -> list[tuple[int, int]]:
    """(pid, uid) of every process started with `value` in its environment or arguments."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            started_with = open(f"/proc/{entry}/environ", "rb").read() + open(f"/proc/{entry}/cmdline", "rb").read()
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if value.encode() in started_with:
            found.append((int(entry), uid))
    return found


def faas(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faas.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=120)


async def test_secrets_and_settings_reach_their_function_only(tmp_path, models):
    (tmp_path / "functions").mkdir()
    (tmp_path / "functions" / "fns.py").write_text(FUNCTIONS)
    log = tmp_path / "node.log"
    with open(log, "ab") as err:
        node = LocalNode(tmp_path / "functions", stderr=err.fileno(), state_dir=tmp_path / "nats")
        node.start()
    admin = ("--nats", node.url, "--state-dir", str(tmp_path / "nats"))
    try:
        assert faas("secret", "set", "API_KEY", "-", *admin, stdin=SECRET).returncode == 0
        out = faas("secret", "set", "UNUSED", "other-value", *admin)
        assert out.returncode == 0 and "other-value" not in out.stdout
        listed = faas("secret", "ls", *admin)
        assert listed.stdout.split() == ["API_KEY", "UNUSED"] and SECRET not in listed.stdout
        assert faas("secret", "set", "bad name", "x", *admin).returncode == 1
        (tmp_path / "huge").write_bytes(b"x" * (64 << 10 | 1))
        (tmp_path / "binary").write_bytes(b"\xff\xfe")
        for hostile, why in ((tmp_path / "huge", "at most 65536"), (tmp_path / "binary", "not UTF-8"),
                             ("/dev/zero", "at most 65536")):  # read no further than the limit
            out = faas("secret", "set", "HOSTILE", "--from-file", str(hostile), *admin)
            assert out.returncode == 1 and why in out.stderr, out.stderr
        async with Client(node.url) as client:
            keeper = (await client.invoke("keeper", {})).output
            assert (keeper["mode"], keeper["key"]) == ("strict", SECRET)
            other = (await client.invoke("other", {})).output
            assert (other["mode"], other["key"]) == (None, None)
            with pytest.raises(HandlerError, match="needs secret NOT_SET_ANYWHERE, which is not set"):
                await client.invoke("needs", {})
            if os.geteuid() == 0:  # namespaces: only the function that asked has the network
                online = (await client.invoke("online", {})).output
                assert other["net"] == ["lo"] and online["net"] != ["lo"]
                # It travels in the sandbox's start frame only: no process on the host was
                # started with it in its environment or on its command line.
                assert _holders(SECRET) == []
        # A producer (no login on the embedded server) cannot read the bucket.
        producer = await nats.connect(node.url)
        try:
            with pytest.raises(Exception):
                kv = await producer.jetstream().key_value("faas_secrets")
                await kv.get("API_KEY")
        finally:
            await producer.drain()
        assert faas("secret", "rm", "UNUSED", *admin).returncode == 0
        assert faas("secret", "ls", *admin).stdout.split() == ["API_KEY"]
    finally:
        node.stop()
    text = log.read_text()
    assert SECRET not in text and "other-value" not in text

