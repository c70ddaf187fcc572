"""`faas up --reload`: edits to the functions folder are served without a restart; a broken
file is reported once and its functions keep serving the version before; the backbone stays
loaded across a reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faas import Client, FunctionNotFound
from faas.localnode import LocalNode
from tests.test_cluster import until

GENERATOR = '''
from faas import function
from faas.bundled import adapter_path, model_path
from _shared import TAG

@function(name="gen", backbone=model_path(), adapter=adapter_path("sql"))
def gen(event, ctx):
    return {{"v": {version}, "tag": TAG, "ids": ctx.generate("SELECT", max_new_tokens=2, ignore_eos=True).token_ids}}
'''


def _events(log: Path, name: str) -> list[dict]:
    found = []
    for line in log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            found.append(event)
    return found


@pytest.fixture()
def folder(tmp_path):
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "_shared.py").write_text("TAG = 'a'\n")
    (functions / "gen.py").write_text(GENERATOR.format(version=1))
    return functions


async def test_reload_serves_edits_survives_a_broken_file_and_keeps_the_backbone(folder, tmp_path, models):
    log = tmp_path / "node.log"
    with open(log, "ab") as err:
        node = LocalNode(folder, stderr=err.fileno(), state_dir=tmp_path / "nats", extra_args=("--reload",))
        node.start()
    try:
        async with Client(node.url) as client:
            async def gen() -> dict:
                return (await client.invoke("gen", {}, timeout_s=60)).output

            first = await gen()
            assert (first["v"], first["tag"]) == (1, "a")
            (folder / "gen.py").write_text(GENERATOR.format(version=2))
            await until(lambda: _has(gen(), v=2), what="version 2 of gen")
            # A helper it imports changed: the function is served anew.
            (folder / "_shared.py").write_text("TAG = 'b'\n")
            await until(lambda: _has(gen(), tag="b"), what="the helper's change")
            # A syntax error: reported once, and version 2 keeps serving.
            (folder / "gen.py").write_text("def broken(:\n")
            await until(lambda: _reported(log, 1), what="the broken file to be reported")
            for _ in range(3):
                assert (await gen())["v"] == 2
            assert len(_events(log, "reload_failed")) == 1
            (folder / "gen.py").write_text(GENERATOR.format(version=3))
            await until(lambda: _has(gen(), v=3), what="version 3 after the fix")
            # A new file: a new function; its file gone: the function too.
            (folder / "extra.py").write_text(
                "from faas import function\n@function(name='extra')\ndef extra(e, ctx):\n    return {'extra': True}\n")
            await until(lambda: _has(client.invoke("extra", {}), extra=True, envelope=True), what="the new function")
            (folder / "extra.py").unlink()

            async def extra_gone() -> bool:
                try:
                    await client.invoke("extra", {}, timeout_s=10)
                except FunctionNotFound:
                    return True
                return False
            await until(extra_gone, what="the removed function to be gone")
            assert first["ids"] == (await gen())["ids"]  # the same model and adapter, the same tokens
    finally:
        node.stop()
    # Four versions of gen were served; the backbone was loaded once.
    assert len(_events(log, "backbone_loading")) == 1
    assert [e["fn"] for e in _events(log, "reload_served")].count("gen") == 3


async def _has(call, envelope: bool = False, **expected) -> bool:
    out = await call
    out = out.output if envelope else out
    return all(out.get(k) == v for k, v in expected.items())


async def _reported(log: Path, count: int) -> bool:
    return len(_events(log, "reload_failed")) == count
