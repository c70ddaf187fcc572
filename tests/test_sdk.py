"""The SDK: specs validated at declaration, the decorator keeps handlers callable, and
`import faas` stays light (no torch) for producers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from faas import Context, SpecError, function
from faas.bundled import adapter_path, model_path
from faas.sdk import spec_of
from runtime.functions.loader import load_file


def plain(event, ctx):
    return event


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "Bad Name"}, "invalid function name"),
    ({"name": "has.dot"}, "invalid function name"),
    ({"name": "ok", "timeout_s": -1}, "timeout_s"),
    ({"name": "ok", "timeout_s": float("nan")}, "timeout_s"),
    ({"name": "ok", "max_queue": 0}, "max_queue"),
    ({"name": "ok", "adapter": "/nonexistent"}, "needs a backbone"),
    ({"name": "ok", "backbone": "/nonexistent/model"}, "'/nonexistent/model' does not exist"),
    ({"name": "ok", "backbone": "/"}, "no config.json"),
])
def test_bad_declarations_fail_at_import(kwargs, match):
    with pytest.raises(SpecError, match=match):
        function(**kwargs)(plain)


def test_missing_adapter_folder(models, tmp_path):
    with pytest.raises(SpecError, match="adapter folder '/nonexistent/adapter' does not exist"):
        function(name="x", backbone=model_path(), adapter="/nonexistent/adapter")(plain)
    with pytest.raises(SpecError, match="has no adapter_config.json"):
        function(name="x", backbone=model_path(), adapter=str(tmp_path))(plain)


def test_relative_paths_resolve_from_the_declaring_file(models, tmp_path, monkeypatch):
    """`adapter="adapters/x"` means next to the function's file, whatever the cwd."""
    shutil.copytree(adapter_path("sql"), tmp_path / "adapters" / "mine")
    (tmp_path / "fn.py").write_text(
        "from faas import function\n"
        f"@function(name='rel', backbone={model_path()!r}, adapter='adapters/mine')\n"
        "def rel(event, ctx):\n    return event\n")
    monkeypatch.chdir("/")
    spec = spec_of(load_file(tmp_path / "fn.py").rel)
    assert spec.adapter == str(tmp_path / "adapters" / "mine")
    (tmp_path / "bad.py").write_text(
        "from faas import function\n"
        f"@function(name='bad', backbone={model_path()!r}, adapter='./missing')\n"
        "def bad(event, ctx):\n    return event\n")
    with pytest.raises(SpecError, match=f"adapter folder '{tmp_path / 'missing'}' does not exist"):
        load_file(tmp_path / "bad.py")


def test_decorated_handler_stays_callable():
    handler = function(name="plain-fn", timeout_s=5)(plain)
    assert handler({"a": 1}, Context("plain-fn", "r1", {})) == {"a": 1}
    spec = spec_of(handler)
    assert spec.name == "plain-fn" and spec.backbone is None and spec.timeout_s == 5


def test_plain_context_cannot_generate():
    with pytest.raises(Exception, match="declares no backbone"):
        Context("plain-fn", "r1", {}).generate("hi")


def test_import_faas_does_not_import_torch():
    code = ("import sys, faas, faas.cli, faas.client, faas.demo, faas.localnode; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'runtime') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_log_lines_of_processes_sharing_one_file_stay_whole(tmp_path):
    """A node, its engines and its sandboxes append JSON logs to one file: each event must
    reach it in one write, or lines of two processes interleave and no longer parse (print
    wrote an event and its newline apart)."""
    logger = ("from faas.logs import configure_logging, get_logger\n"
              "configure_logging()\n"
              "log = get_logger(component='writer')\n"
              "for i in range(3000):\n"
              "    log.info('line', i=i, pad='p' * 200)\n")
    path = tmp_path / "shared.log"
    with open(path, "ab") as out:
        writers = [subprocess.Popen([sys.executable, "-c", logger], stderr=out) for _ in range(3)]
        assert [w.wait(60) for w in writers] == [0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 9000
    assert sorted(json.loads(line)["i"] for line in lines) == sorted(list(range(3000)) * 3)
