"""Every code block of the README runs, in order, as a reader would run it: the files it
shows are written, the node it starts serves, the calls it makes succeed.

A block's info string says how: `python` and `bash` blocks run (from a scratch folder, with
the project's `faas` first on PATH, as after `. .venv/bin/activate`) and must exit 0;
`python file=PATH` is a file the reader saves; `bash serve` is a long-running command (run
in the background until the end, once it printed `ready`); `bash from-clone` runs from the
clone's root; `bash needs-nats-cli` needs the nats CLI (it is skipped, saying so, where that
is not installed); `text` is output. The README's ports (4222, 8080) are replaced by free
ones (also where the CLI's default server is meant), so the test runs beside anything else
on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from faas.localnode import free_port
from tests.conftest import ROOT

README = ROOT / "README.md"
_FENCE = re.compile(r"^```(\S*)(.*)$")


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    tags: tuple[str, ...]
    text: str

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.lang}" + "".join(f"-{t}" for t in self.tags)


def blocks(path: Path) -> list[Block]:
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            found.append(Block(i + 1, match.group(1), tuple(match.group(2).split()),
                               "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return found


BLOCKS = blocks(README)


class Reader:
    """What a reader has done so far: the scratch folder, the ports, the servers started."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = {"4222": str(free_port()), "8080": str(free_port())}
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        # The CLI's default server is nats://127.0.0.1:4222: the replaced port, here.
        self.env["FAAS_NATS_URL"] = f"nats://127.0.0.1:{self.ports['4222']}"
        self.servers: list[tuple[subprocess.Popen[bytes], Path]] = []

    def text(self, block: Block) -> str:
        text = block.text
        for port, ours in self.ports.items():
            text = text.replace(port, ours)
        return text

    def run(self, block: Block, timeout_s: float = 600.0) -> str:
        text = self.text(block)
        cwd = ROOT if "from-clone" in block.tags else self.folder
        if block.lang == "python":
            argv = [sys.executable, "-c", text]
        else:
            argv = ["bash", "-euo", "pipefail", "-c", text]
        done = subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, timeout=timeout_s)
        out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        assert done.returncode == 0, f"README line {block.line} exited {done.returncode}:\n{out[-4000:]}"
        return out

    def serve(self, block: Block, ready_timeout_s: float = 600.0) -> None:
        log = self.folder / f"serve-{block.line}.log"
        with open(log, "wb") as err:
            # Without FAAS_NATS_URL: `faas up` would take it for an external server.
            env = {k: v for k, v in self.env.items() if k != "FAAS_NATS_URL"}
            proc = subprocess.Popen(["bash", "-c", f"exec {self.text(block).strip()}"], cwd=self.folder,
                                    env=env, stdout=subprocess.PIPE, stderr=err)
        self.servers.append((proc, log))
        assert proc.stdout is not None
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if line.startswith("ready"):
                return
            if not line and proc.poll() is not None:
                break
        pytest.fail(f"README line {block.line} did not print ready:\n{log.read_text()[-4000:]}")

    def stop(self) -> None:
        for proc, _ in self.servers:
            proc.send_signal(signal.SIGINT)  # Ctrl-C, as the README says
        for proc, _ in self.servers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def reader(models, tmp_path_factory):
    reader = Reader(tmp_path_factory.mktemp("reader"))
    yield reader
    reader.stop()


def test_the_readme_has_blocks_of_each_kind_it_documents():
    kinds = {(b.lang, b.tags) for b in BLOCKS}
    assert {("bash", ("serve",)), ("bash", ("from-clone",)), ("bash", ()), ("python", ())} <= kinds
    unknown = [b.id for b in BLOCKS if b.lang not in ("python", "bash", "text")
               or set(b.tags) - {"serve", "from-clone", "needs-nats-cli"} - {t for t in b.tags if t.startswith("file=")}]
    assert not unknown, f"README blocks this test does not know how to run: {unknown}"


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang != "text"], ids=lambda b: b.id)
def test_a_readme_block_runs(block: Block, reader: Reader):
    file = next((t.removeprefix("file=") for t in block.tags if t.startswith("file=")), None)
    if file is not None:
        target = reader.folder / file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(reader.text(block))
        subprocess.run([sys.executable, "-m", "py_compile", str(target)], check=True)
    elif "serve" in block.tags:
        reader.serve(block)
    elif "needs-nats-cli" in block.tags and shutil.which("nats") is None:
        pytest.skip("the nats CLI is not installed here (github.com/nats-io/natscli)")
    elif "from-clone" in block.tags:
        # `make test` is this very suite: CI runs it (.ci/run), so it is checked there.
        commands = [line.split("#")[0].strip() for line in block.text.splitlines()]
        assert "make test" in commands and "make test" in (ROOT / ".ci" / "run").read_text()
        rest = "\n".join(c for c in commands if c and c != "make test")
        out = reader.run(Block(block.line, block.lang, block.tags, rest + "\n"))
        assert "FUNCTION" in out  # make demo's table
    else:
        out = reader.run(block)
        assert "Traceback" not in out and not re.search(r"^error", out, re.MULTILINE), out


def _anchors(markdown: Path) -> set[str]:
    """The anchors of a Markdown file's headings (as GitHub writes them) and its `<a id>`s."""
    found: set[str] = set()
    in_code = False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower())
            found.add(title.replace(" ", "-"))
        found.update(re.findall(r'<a id="([^"]+)"', line))
    return found


def test_every_link_of_the_readme_and_docs_leads_somewhere():
    broken = []
    for markdown in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", markdown.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (markdown.parent / path).resolve() if path else markdown
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
                broken.append(f"{markdown.relative_to(ROOT)}: {target}")
    assert not broken
