"""A root node serves models from wherever a user keeps them: under /tmp (which sandboxes and
discovery see privately), inside a folder closed to others laid out like root's Hugging Face
cache (snapshot files are links into `blobs`), and with weights of mode 0600 (what
safetensors writes, so any model or adapter saved by root). Outputs equal the reference."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from faas import Client, FaasError
from faas.artifacts import declared_models_problem
from faas.bundled import TINY_LLAMA
from faas.localnode import LocalNode
from runtime.functions.readable import model_view
from tests.reference import greedy_token_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandbox uids are used by root nodes only")

FUNCTIONS = '''
from faas import function

@function(name="from_tmp", backbone={tmp_model!r}, adapter={tmp_adapter!r}, engine="sandbox")
def from_tmp(event, ctx):
    return {{"ids": ctx.generate(event["prompt"], max_new_tokens=8, ignore_eos=True).token_ids}}

@function(name="from_cache", backbone={cache_model!r}, adapter={cache_adapter!r})
def from_cache(event, ctx):
    return {{"ids": ctx.generate(event["prompt"], max_new_tokens=8, ignore_eos=True).token_ids}}
'''


def _hub_layout(model: Path, cache: Path) -> Path:
    """`model` laid out as huggingface_hub caches it: a snapshot of links into `blobs`."""
    repo = cache / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in model.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        blob.chmod(0o644)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture()
def places(models):
    root = Path(tempfile.mkdtemp(prefix="faas-paths-", dir="/tmp"))
    root.chmod(0o755)
    bundled = models / TINY_LLAMA
    tmp_model, tmp_adapter = root / "model", root / "adapter"
    shutil.copytree(bundled, tmp_model)
    shutil.copytree(bundled / "adapters" / "support", tmp_adapter)
    shutil.rmtree(tmp_model / "adapters")
    (tmp_model / "model.safetensors").chmod(0o600)
    (tmp_adapter / "adapter_model.safetensors").chmod(0o600)
    closed = root / "root-home" / ".cache" / "huggingface"
    closed.mkdir(parents=True)
    (root / "root-home").chmod(0o700)  # as /root is
    cache_model = _hub_layout(tmp_model, closed)
    cache_adapter = closed / "adapters" / "sql"
    shutil.copytree(bundled / "adapters" / "sql", cache_adapter)
    functions = root / "functions"
    functions.mkdir()
    (functions / "paths.py").write_text(FUNCTIONS.format(
        tmp_model=str(tmp_model), tmp_adapter=str(tmp_adapter),
        cache_model=str(cache_model), cache_adapter=str(cache_adapter)))
    yield {"root": root, "functions": functions, "from_tmp": (tmp_model, tmp_adapter),
           "from_cache": (cache_model, cache_adapter)}
    shutil.rmtree(root, ignore_errors=True)


async def test_a_root_node_serves_models_under_tmp_in_closed_folders_and_of_mode_0600(places, tmp_path):
    with open(tmp_path / "node.log", "wb") as log:
        node = LocalNode(places["functions"], stderr=log.fileno(), state_dir=tmp_path / "nats")
        node.start()
    try:
        async with Client(node.url) as client:
            for name in ("from_tmp", "from_cache"):
                backbone, adapter = places[name]
                expected = greedy_token_ids(str(backbone), str(adapter), "SELECT name FROM", 8)
                out = await client.invoke(name, {"prompt": "SELECT name FROM"}, timeout_s=120)
                assert out.output["ids"] == expected, name
    finally:
        node.stop()
    events = [json.loads(line) for line in (tmp_path / "node.log").read_text().splitlines()
              if line.startswith("{")]
    staged = {Path(e["folder"]).name for e in events if e.get("event") == "model_staged"}
    # Only what the sandboxes' uids may not read is copied: the 0600 weights under /tmp;
    # the closed cache's world-readable files are bound where they are.
    assert staged == {"model", "adapter"}
    assert (places["from_tmp"][0] / "model.safetensors").stat().st_mode & 0o777 == 0o600  # untouched


def test_a_missing_or_wrong_model_folder_is_named_with_its_real_cause(tmp_path):
    assert declared_models_problem(str(tmp_path / "nope"), None) == \
        f"backbone folder {str(tmp_path / 'nope')!r} does not exist"
    assert declared_models_problem(str(tmp_path), None) == f"backbone folder {str(tmp_path)!r} has no config.json"
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    assert "has no adapter_config.json" in declared_models_problem(str(tmp_path), str(tmp_path / "adapter"))
    assert declared_models_problem("org/hub-model", None) is None  # fetched by the node, not a folder


async def test_a_node_refuses_to_start_naming_a_declared_folder_that_does_not_exist(tmp_path):
    (tmp_path / "functions").mkdir()
    missing = tmp_path / "gone"
    (tmp_path / "functions" / "f.py").write_text(
        f"from faas import function\n@function(name='f', backbone={str(missing)!r})\ndef f(e, ctx):\n    return {{}}\n")
    with open(tmp_path / "node.log", "wb") as log:
        node = LocalNode(tmp_path / "functions", stderr=log.fileno(), state_dir=tmp_path / "nats")
        with pytest.raises(Exception, match="did not become ready"):
            node.start(ready_timeout_s=60)
    assert f"function 'f' ({tmp_path / 'functions' / 'f.py'}): backbone folder {str(missing)!r} does not exist" \
        in (tmp_path / "node.log").read_text()


def _adapter(where: Path, mode: int = 0o644) -> Path:
    where.mkdir(parents=True)
    (where / "adapter_config.json").write_text("{}")
    (where / "adapter_model.safetensors").write_bytes(b"weights")
    for file in where.iterdir():
        file.chmod(mode)
    return where


def test_a_copy_is_staged_once_for_its_function_s_group_and_again_when_the_source_changes(tmp_path):
    source = _adapter(tmp_path / "adapter", mode=0o600)
    staged = tmp_path / "staged"
    view = model_view(str(source), (61999,), staged, 61999, "fn", lender=0)
    copy = Path(view.path)
    assert copy.parent == staged and view.expose == (str(copy),)
    weights = copy / "adapter_model.safetensors"
    info = weights.stat()
    assert weights.read_bytes() == b"weights" and (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, 61999, 0o640)
    assert (source / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600  # the source is untouched
    assert model_view(str(source), (61999,), staged, 61999, "fn", lender=0).path == view.path
    assert weights.stat().st_ino == info.st_ino  # reused, not copied again
    (source / "adapter_model.safetensors").write_bytes(b"retrained")
    model_view(str(source), (61999,), staged, 61999, "fn", lender=0)
    assert weights.read_bytes() == b"retrained"


def test_the_node_lends_its_rights_over_nothing_a_function_should_not_read(tmp_path, faas_home):
    staged = tmp_path / "staged"
    escaping = _adapter(tmp_path / "escaping")
    (escaping / "extra").symlink_to("/etc/shadow")
    with pytest.raises(FaasError, match="leads to /etc/shadow, outside"):
        model_view(str(escaping), (61999,), staged, 61999, "fn", lender=0)
    # Root's 0600 adapter, declared by a function whose file someone else owns.
    with pytest.raises(FaasError, match="belongs to uid 0, not to uid 1234"):
        model_view(str(_adapter(tmp_path / "roots", mode=0o600)), (61999,), staged, 61999, "fn", lender=1234)
    # A readable adapter in a folder closed to others: the same.
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(FaasError, match="belongs to uid 0, not to uid 1234"):
        model_view(str(_adapter(closed / "a")), (61999,), staged, 61999, "fn", lender=1234)
    assert model_view(str(closed / "a"), (61999,), staged, 61999, "fn", lender=0).expose == (str(closed / "a"),)
    # Another function's deployed adapter in the state folder.
    deployed = _adapter(faas_home / "deployed-test" / "victim" / "adapter", mode=0o640)
    try:
        with pytest.raises(FaasError, match="state folder"):
            model_view(str(deployed), (61999,), staged, 61999, "fn", lender=0)
    finally:
        shutil.rmtree(faas_home / "deployed-test")
    assert not staged.exists() or not [p for p in staged.iterdir() if not p.name.endswith(".lock")]
