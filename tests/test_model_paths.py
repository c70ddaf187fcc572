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
from runtime.functions.readable import lend_problem, model_view, sweep_staged
from tests.reference import greedy_token_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandbox uids are used by root nodes only")

FUNCTIONS = '''
from faas import function

@function(name="from_tmp", backbone={tmp_model!r}, adapter={tmp_adapter!r}, engine="sandbox")
def from_tmp(event, ctx):
    return {{"ids": ctx.generate(event["prompt"], max_new_tokens=8, ignore_eos=True).token_ids}}

@function(name="plain_tmp", backbone={tmp_model!r})  # the same staged backbone: one copy, one load
def plain_tmp(event, ctx):
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
    with open(tmp_path / "node.log", "ab") as log:  # appended to by the node and its children
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
    staged = [Path(e["folder"]).name for e in events if e.get("event") == "model_staged"]
    # Only what the sandboxes' uids may not read is copied: the 0600 weights under /tmp;
    # the closed cache's world-readable files are bound where they are.
    assert sorted(staged) == ["adapter", "model"]
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
    (where / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (where / "adapter_model.safetensors").write_bytes(b"weights")
    (where / "notes.sh").write_text("not a model file")
    for file in where.iterdir():
        file.chmod(mode)
    return where


def _view(folder: Path, group: int = 61999, lender: int | None = 0, roots: tuple[Path, ...] = (Path("/tmp"),)):
    return model_view("adapter", str(folder), (group,), group, "adapter:fn", lender, roots)


@pytest.fixture()
def scratch():
    """A folder under /tmp (a place the node lends its rights in), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="faas-lend-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_copy_is_staged_once_per_group_and_again_when_the_source_changes(scratch, faas_home):
    source = _adapter(scratch / "adapter", mode=0o600)
    view = _view(source)
    copy = Path(view.path)
    try:
        assert copy.parent == faas_home / "staged" and view.expose == (str(copy),)
        weights = copy / "adapter_model.safetensors"
        info = weights.stat()
        assert weights.read_bytes() == b"weights" and (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, 61999, 0o640)
        assert not (copy / "notes.sh").exists()  # model files only
        assert (source / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600  # the source is untouched
        again = _view(source)
        assert again.path == view.path and weights.stat().st_ino == info.st_ino  # reused, not copied again
        other_group = _view(source, group=62001)  # another node's function: a copy of its own
        assert other_group.path != view.path and Path(other_group.path, "adapter_model.safetensors").stat().st_gid == 62001
        (source / "adapter_model.safetensors").write_bytes(b"retrained")
        changed = _view(source)
        assert Path(changed.path, "adapter_model.safetensors").read_bytes() == b"retrained"
        # Nobody holds the first copy any more: a node starting removes it, not those held.
        for held in (view, again, other_group):
            os.close(held.lock)
        sweep_staged(faas_home / "staged")
        assert not copy.exists() and not Path(other_group.path).exists() and Path(changed.path).is_dir()
    finally:
        os.close(changed.lock)
        sweep_staged(faas_home / "staged")


def test_the_node_lends_its_rights_over_nothing_a_function_should_not_read(scratch, faas_home):
    escaping = _adapter(scratch / "escaping")
    (escaping / "extra").symlink_to("/etc/shadow")
    with pytest.raises(FaasError, match="leads to /etc/shadow, outside"):
        _view(escaping)
    # Root's 0600 adapter, declared by a function whose file someone else owns.
    with pytest.raises(FaasError, match="belongs to uid 0, not to uid 1234"):
        _view(_adapter(scratch / "roots", mode=0o600), lender=1234)
    # A readable adapter in a folder closed to others: the same; its owner's own function may.
    closed = scratch / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(FaasError, match="inside a folder closed to others.*belongs to uid 0, not to uid 1234"):
        _view(_adapter(closed / "a"), lender=1234)
    assert _view(closed / "a").expose == (str(closed / "a"),)
    # Whatever root keeps that a function names: not where models are kept, not a model.
    elsewhere = Path(tempfile.mkdtemp(prefix="faas-elsewhere-", dir="/var/lib"))
    try:
        with pytest.raises(FaasError, match="outside the places the node lends its rights in"):
            _view(_adapter(elsewhere / "a", mode=0o600))
    finally:
        shutil.rmtree(elsewhere)
    docker = scratch / "docker"
    docker.mkdir()
    (docker / "config.json").write_text('{"auths": {"registry": {"auth": "secret"}}}')
    (docker / "config.json").chmod(0o600)
    with pytest.raises(FaasError, match="does not look like a model"):
        model_view("backbone", str(docker), (61999,), None, "backbone", 0, (Path("/tmp"),))
    # Another function's deployed adapter, in the state folder.
    deployed = _adapter(faas_home / "deployed-test" / "victim" / "adapter", mode=0o640)
    try:
        with pytest.raises(FaasError, match="state folder"):
            _view(deployed, roots=(faas_home,))
    finally:
        shutil.rmtree(faas_home / "deployed-test")


def test_the_lending_rule_as_data(tmp_path):
    """`lend_problem` decides from plain data: folders, owners, places."""
    home, bundled = Path("/var/lib/faas"), Path("/var/lib/faas/models")
    adapter = _adapter(tmp_path / "a")
    files = [(".", adapter, adapter.stat())]
    assert lend_problem("adapter", adapter, files, 0, (tmp_path,), home, bundled) is None
    assert "state folder" in lend_problem("adapter", adapter, files, 0, (tmp_path,), adapter.parent, bundled)
    assert lend_problem("adapter", adapter, files, 0, (tmp_path,), adapter.parent, adapter.parent) is None
    assert "outside the places" in lend_problem("adapter", adapter, files, 0, (Path("/srv"),), home, bundled)
    assert "belongs to uid 0" in lend_problem("adapter", adapter, files, 7, (tmp_path,), home, bundled)
    assert "does not look like a model" in lend_problem("backbone", adapter, files, 0, (tmp_path,), home, bundled)
