"""The `faas` command against the session node and nodes of its own: invoke prints JSON
(or the streamed text) or fails with exit 1, ls and top list what is served in the
terminal's width, help shows defaults, events' subcommands, `faas new`'s folder serves and
passes its own test, deploy says what it stores, old Pythons get one line."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from faas.localnode import LocalNode

ROOT = Path(__file__).resolve().parent.parent


def faas(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faas.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


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


# --- help ------------------------------------------------------------------------------------

def _commands(parser: argparse.ArgumentParser,
              prefix: str = "faas") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command parser of `parser`, by its command line."""
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, f"{prefix} {name}")
    return found


def test_help_shows_every_default(monkeypatch):
    """Each option's help ends with its default where it has one, for every command; flags
    and options without a default say nothing of one."""
    from faas.cli import build_parser

    for var in [v for v in os.environ if v.startswith("FAAS_NATS_")]:
        monkeypatch.delenv(var)
    checked = 0
    for command, parser in _commands(build_parser()):
        assert "default: None" not in parser.format_help(), command
        assert "default: False" not in parser.format_help(), command
        for action in parser._actions:
            if any(action.default is no for no in (None, False, argparse.SUPPRESS)) or action.nargs == 0 \
                    or not (action.option_strings or action.nargs in ("?", "*")):
                continue
            formatter = parser._get_formatter()
            formatter.add_argument(action)
            text = " ".join(formatter.format_help().split())
            # Said by the formatter, or by the text itself (e.g. "default: hybrid histogram").
            said = f"(default: {action.default})" in text or "default" in text and str(action.default) in text
            assert said, f"{command} {action.option_strings or action.dest}: {text}"
            checked += 1
    assert checked >= 20  # faas up's options among them
    up = faas("up", "--help")
    assert "--sandbox-keep-alive-s" in up.stdout and "(default: 600.0)" in up.stdout, up.stdout
    assert "(default: 4222)" in up.stdout


def test_help_never_shows_a_secret_from_the_environment():
    """Logins come from FAAS_NATS_* variables: help names the variable, not its value."""
    out = faas("invoke", "--help", env={"FAAS_NATS_PASSWORD": "hunter2-secret",
                                        "FAAS_NATS_URL": "nats://user:pw-secret@h:4222"})
    assert out.returncode == 0
    assert "(env FAAS_NATS_PASSWORD)" in out.stdout
    assert "secret" not in out.stdout


# --- events: dlq and replay -----------------------------------------------------------------

def _dead_letters(node, function: str, *options: str) -> list[dict]:
    out = faas("events", *options, "dlq", function, "--nats", node.url, "--state-dir", str(node.state_dir))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _wait_for_letter(node, function: str, found) -> dict:
    deadline = time.monotonic() + 30
    while not (letters := [x for x in _dead_letters(node, function, "--json") if found(x)]):
        assert time.monotonic() < deadline, f"no such dead letter of {function}"
        time.sleep(0.3)
    return letters[0]


def test_events_dlq_and_replay_subcommands(node):
    """An event `picky` refuses becomes a dead letter that `faas events dlq` lists (options
    before or after the subcommand) and `faas events replay` publishes again."""
    mark = f"cli-{uuid.uuid4().hex[:8]}"
    published = faas("publish", "events.picky", json.dumps({"invalid": True, "n": mark}), "--nats", node.url)
    assert published.returncode == 0, published.stderr
    letter = _wait_for_letter(node, "picky", lambda x: x["error"]["message"] == f"refusing event {mark}")
    options_first = faas("events", "--json", "--nats", node.url, "--state-dir", str(node.state_dir),
                         "dlq", "picky")
    assert options_first.returncode == 0 and letter in json.loads(options_first.stdout)
    table = faas("events", "dlq", "picky", "--nats", node.url, "--state-dir", str(node.state_dir))
    assert table.stdout.startswith("SEQ") and f"refusing event {mark}" in table.stdout

    replayed = faas("events", "replay", "picky", str(letter["seq"]), "--nats", node.url,
                    "--state-dir", str(node.state_dir))
    assert replayed.returncode == 0, replayed.stderr
    new_seq = int(replayed.stdout.split()[-1])  # "replayed dead letter S of picky as event N"
    assert f"replayed dead letter {letter['seq']} of picky as event" in replayed.stdout
    again = _wait_for_letter(node, "picky", lambda x: x["event"]["sequence"] == new_seq)
    assert again["error"]["message"] == f"refusing event {mark}"  # the same event, refused again

    listed = faas("events", "--json", "--nats", node.url, "--state-dir", str(node.state_dir))
    assert listed.returncode == 0 and "picky" in {r["function"] for r in json.loads(listed.stdout)}
    missing = faas("events", "replay", "picky", "999999999", "--nats", node.url,
                   "--state-dir", str(node.state_dir))
    assert missing.returncode == 1 and missing.stderr.startswith("error")
    assert "no dead letter 999999999 of 'picky'" in missing.stderr


def test_events_subcommands_without_their_arguments_are_usage_errors():
    no_seq = faas("events", "replay", "picky")
    assert no_seq.returncode == 2 and no_seq.stdout == ""
    assert "usage: faas events replay" in no_seq.stderr
    assert "the following arguments are required: seq" in no_seq.stderr
    no_function = faas("events", "dlq")
    assert no_function.returncode == 2 and "required: function" in no_function.stderr
    unknown = faas("events", "purge", "picky")
    assert unknown.returncode == 2 and "invalid choice: 'purge'" in unknown.stderr


# --- invoke --stream ---------------------------------------------------------------------------

def test_invoke_stream_prints_the_text_as_it_comes(node):
    event = json.dumps({"prompt": "hello", "max_new_tokens": 30, "stop": "zzzz"})
    plain = faas("invoke", "writer", event, "--nats", node.url)
    assert plain.returncode == 0, plain.stderr
    streamed = faas("invoke", "writer", event, "--stream", "--metrics", "--nats", node.url)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == json.loads(plain.stdout)["text"] + "\n"
    assert "ttft_ms" in json.loads(streamed.stderr.splitlines()[-1])
    # As it comes: the first text is out while the function still generates.
    long = subprocess.Popen([sys.executable, "-m", "faas.cli", "invoke", "writer",
                             json.dumps({"prompt": "hello", "max_new_tokens": 1000, "ignore_eos": True}),
                             "--stream", "--nats", node.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert long.stdout.read(1)
        assert long.poll() is None
        rest, errors = long.communicate(timeout=120)
    finally:
        long.kill()
    assert long.returncode == 0, errors
    assert rest.endswith("\n") and len(rest) > 100


def test_invoke_stream_errors_and_plain_functions(node):
    failed = faas("invoke", "boom", '{"why": "streamed"}', "--stream", "--nats", node.url)
    assert failed.returncode == 1 and failed.stdout == ""
    assert "error 500: ValueError: bad things: streamed" in failed.stderr
    plain = faas("invoke", "echo", '{"q": "not streamed"}', "--stream", "--nats", node.url)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["echo"] == {"q": "not streamed"}  # printed as without --stream
    for function in ("boom", "no-such-function"):  # errors as without --stream
        outs = [faas("invoke", function, '{"why": "same"}', *stream, "--nats", node.url)
                for stream in ((), ("--stream",))]
        assert len({(o.returncode, o.stdout, o.stderr) for o in outs}) == 1 and outs[0].returncode == 1


# --- faas new, and tables in 80 columns ----------------------------------------------------------

# As long as a function name may be (63 characters), served by a node with a long id too.
LONG_NAME = "a-function-whose-name-is-as-long-as-any-function-name-may-be-ok"
LONG_NODE = "a-node-whose-id-is-long-enough-to-push-every-table-past-80-cols"


@pytest.fixture(scope="module")
def scaffolded(models, tmp_path_factory):
    """`faas new LONG_NAME`, and a node serving that folder."""
    root = tmp_path_factory.mktemp("new")
    made = faas("new", LONG_NAME, "--dir", str(root))
    assert made.returncode == 0, made.stderr
    folder = root / LONG_NAME
    with open(root / "node.log", "ab") as log:
        served = LocalNode(folder, state_dir=root / "nats", stderr=log.fileno(),
                           extra_args=("--node-id", LONG_NODE))
        served.start()
    yield folder, served, made.stdout
    served.stop()


def test_new_writes_a_function_a_node_serves(scaffolded):
    folder, served, printed = scaffolded
    module = LONG_NAME.replace("-", "_")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py")) == [
        f"{module}.py", f"tests/test_{module}.py"]
    assert f"created {folder / (module + '.py')}" in printed and f"faas up --functions {folder}" in printed
    out = faas("invoke", LONG_NAME, '{"prompt": "hi"}', "--nats", served.url)
    assert out.returncode == 0, out.stderr
    output = json.loads(out.stdout)
    assert isinstance(output["text"], str) and output["finish_reason"] in ("stop", "length")
    streamed = faas("invoke", LONG_NAME, '{"prompt": "hi"}', "--stream", "--nats", served.url)
    assert streamed.returncode == 0 and streamed.stdout == output["text"] + "\n", streamed.stderr
    refused = faas("invoke", LONG_NAME, "{}", "--nats", served.url)
    assert refused.returncode == 1 and "error 400: the event needs a non-empty 'prompt'" in refused.stderr


def test_new_s_own_test_passes(scaffolded):
    folder, _, _ = scaffolded
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=folder, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout


def test_new_refuses_a_bad_name_or_an_existing_folder(tmp_path):
    for name in ("Upper", "9lives", "a" * 64, "has space", "../escape"):
        out = faas("new", name, "--dir", str(tmp_path))
        assert out.returncode == 2 and out.stderr.startswith(f"error: invalid function name {name!r}")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    out = faas("new", "taken", "--dir", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr == f"error: {tmp_path / 'taken'} exists: faas new only writes a new folder\n"
    assert list((tmp_path / "taken").iterdir()) == []
    out = faas("new", "json", "--dir", str(tmp_path))  # json.py would shadow the module
    assert out.returncode == 2 and "is the name of an installed module" in out.stderr


def test_top_and_ls_fit_80_columns(scaffolded):
    folder, served, _ = scaffolded
    assert faas("invoke", LONG_NAME, '{"prompt": "hi"}', "--nats", served.url).returncode == 0
    narrow = {"COLUMNS": "80"}
    top = faas("top", "--once", "--nats", served.url, env=narrow)
    ls = faas("ls", "--nats", served.url, "--state-dir", str(served.state_dir), env=narrow)
    for out in (top, ls):
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert max(map(len, lines)) <= 80, out.stdout
        header, row = lines[0].split(), lines[1].split()
        assert header[:2] == ["NODE", "FUNCTION"] and "IDLE" in header and "QUEUED" in header
        # Cut in the middle: the start and the end of each stay.
        assert row[0].startswith(LONG_NODE[:4]) and row[0].endswith(LONG_NODE[-4:]) and "…" in row[0]
        assert row[1].startswith(LONG_NAME[:4]) and row[1].endswith(LONG_NAME[-4:]) and "…" in row[1]
        assert lines[2].startswith("(left out to fit: ")
    assert top.stdout.splitlines()[-1] == "1 node(s)"
    # Read by a script (no terminal, no COLUMNS): whole cells.
    whole = faas("top", "--once", "--nats", served.url, env={"COLUMNS": ""})
    assert whole.stdout.splitlines()[1].split()[:2] == [LONG_NODE, LONG_NAME]
    assert "TTFT_P99" in whole.stdout.splitlines()[0]


# --- deploy ------------------------------------------------------------------------------------

def test_deploy_says_what_it_stores(node, tmp_path):
    """One line per file, with its size, then the total; the versions on stdout as before."""
    assert faas("new", "cli-deployed", "--dir", str(tmp_path)).returncode == 0
    folder = tmp_path / "cli-deployed"
    state = ("--nats", node.url, "--state-dir", str(node.state_dir))
    out = faas("deploy", str(folder), *state)
    try:
        assert out.returncode == 0, out.stderr
        assert out.stdout == "cli-deployed: version 1\n"
        size = (folder / "cli_deployed.py").stat().st_size
        shown = f"{size} B" if size < 1024 else f"{size / 1024:.1f} KiB"
        assert f"cli-deployed: cli_deployed.py ({shown})\n" in out.stderr
        lines = out.stderr.splitlines()
        adapter = [line for line in lines if line.startswith("cli-deployed: adapter ")]
        assert {line.split()[2] for line in adapter} >= {"adapter_config.json", "adapter_model.safetensors"}
        assert any(line.startswith(f"storing {1 + len(adapter)} file(s), ") for line in lines), out.stderr
    finally:
        faas("rm", "cli-deployed", *state)


# --- old Pythons -----------------------------------------------------------------------------

def test_an_old_python_gets_one_line():
    """faas/__init__.py parses on old Pythons and checks the version before it imports
    anything that would not: the console script and `import faas` print one line."""
    from faas import python_problem

    ast.parse((ROOT / "faas" / "__init__.py").read_text(), feature_version=(3, 8))
    assert python_problem((3, 10, 12, "final", 0)) == "faas needs Python 3.11 or newer; this is 3.10"
    assert python_problem((3, 11, 0)) is None and python_problem() is None
    # The check runs first on import: with the version a 3.9 reports, nothing else is imported.
    old = subprocess.run([sys.executable, "-c", "import sys; sys.version_info = (3, 9, 18, 'final', 0); "
                          "import faas.cli"], capture_output=True, text=True, timeout=60)
    assert (old.returncode, old.stdout) == (1, "")
    assert old.stderr == "faas needs Python 3.11 or newer; this is 3.9\n"


def test_tables_never_print_a_control_sequence():
    """Cells may come from a bucket anyone with write access filled (a deployer's name)."""
    from faas.cli import format_table

    out = format_table([("BY", "X"), ("\x1b]0;pwned\x07evil\x1b[2J", "ok\nnext")])
    assert "\x1b" not in out and "\x07" not in out and out.splitlines()[1].startswith("?]0;pwned?evil")
