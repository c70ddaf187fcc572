"""The container setup, checked without Docker: docker-compose.yml's structure, the NATS
cluster and authorization config (tested by the real nats-server), the Dockerfiles, and that
every `faas` command a container runs parses with the real CLI parser."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from faas.cli import build_parser
from faas.client import Client
from runtime.node.natsd import nats_server_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict = COMPOSE["services"]
NATS = ("nats-1", "nats-2", "nats-3")
NODES = ("node-1", "node-2")
DOCKERFILES = (ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.cuda")
AUTH_CONF = ROOT / "docker" / "nats" / "auth.conf"
USERS = {"faas-node", "faas-admin", "producer"}
_OPERATOR = re.compile(r"^[();<>|&]+$")


def _words(line: str) -> list[str]:
    """A shell command's words up to its first operator (`||`, `;`, `>`...)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if _OPERATOR.match(word):
            break
        words.append(word)
    return words


def _host_path(service: dict, container_path: str) -> Path:
    """The file of this repository that a service sees at `container_path` (a bind mount)."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")) and (container_path == target
                                              or container_path.startswith(target.rstrip("/") + "/")):
            return (ROOT / source / os.path.relpath(container_path, target)).resolve()
    raise AssertionError(f"{container_path} is not bind-mounted from the repository: {service.get('volumes')}")


def _faas_services() -> dict[str, dict]:
    """The services that run the faas image (built from one of our Dockerfiles)."""
    return {name: svc for name, svc in SERVICES.items() if "build" in svc}


def _service_commands() -> list[tuple[str, list[str]]]:
    """(id, argv after `faas`) for every faas command a compose service runs."""
    commands = []
    for name, svc in _faas_services().items():
        if "entrypoint" in svc:  # a script, e.g. the producer's loop
            script = _host_path(svc, svc["entrypoint"][-1]).read_text().replace("\\\n", " ")
            lines = [_words(line) for line in script.splitlines()]
            found = [(f"{name}:{words[1]}", words[1:]) for words in lines if words[:1] == ["faas"]]
            assert found, f"{name}'s script runs no faas command"
            commands += found
        else:
            commands.append((name, list(svc["command"])))
    return commands


def _dockerfile_commands() -> list[tuple[str, list[str]]]:
    """(id, argv after `faas`) for each image's healthcheck and default command."""
    commands = []
    for dockerfile in DOCKERFILES:
        instructions = _instructions(dockerfile)
        (check,) = [args for op, args in instructions if op == "HEALTHCHECK"]
        words = _words(check.split(" CMD ", 1)[1].replace("$(hostname)", "node-1"))
        assert words[0] == "faas", check
        commands.append((f"{dockerfile.name}:HEALTHCHECK", words[1:]))
        (cmd,) = [args for op, args in instructions if op == "CMD"]
        commands.append((f"{dockerfile.name}:CMD", json.loads(cmd)))
    return commands


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuations joined."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(op.upper(), args.strip()) for op, _, args in
            (line.strip().partition(" ") for line in joined.splitlines() if line.strip())]


def _size_bytes(text: str | int) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).lower())
    assert match, f"not a size: {text!r}"
    return int(match[1]) * 1024 ** " kmg".index(match[2] or " ")


def _nats_conf(name: str) -> Path:
    command = SERVICES[name]["command"]
    return _host_path(SERVICES[name], command[command.index("-c") + 1])


def _env_references(conf_text: str) -> set[str]:
    """The environment variables a nats-server config reads (`$VAR` outside strings/comments)."""
    text = re.sub(r'"[^"]*"', '""', conf_text)
    text = re.sub(r"#.*", "", text)
    return set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text))


def _conf_texts(conf: Path) -> str:
    """A config with its `include`s (relative to the including file, as nats-server reads them)."""
    text = conf.read_text()
    for included in re.findall(r"^\s*include\s+\"?([^\"\s]+)\"?", text, re.MULTILINE):
        text += "\n" + _conf_texts(conf.parent / included)
    return text


# --- docker-compose.yml -----------------------------------------------------------------

def test_three_nats_servers_form_one_jetstream_cluster():
    names = set()
    for name in NATS:
        svc = SERVICES[name]
        assert svc["image"].startswith("nats:2."), svc["image"]
        conf = _conf_texts(_nats_conf(name))
        assert re.search(r"^\s*jetstream\s*\{[^}]*store_dir:\s*/data", conf, re.MULTILINE), conf
        assert any(v.endswith(":/data") for v in svc["volumes"]), "JetStream data must outlive the container"
        cluster = re.search(r"^cluster\s*\{(.*?)^\}", conf, re.MULTILINE | re.DOTALL)
        assert cluster, "no cluster block"
        assert re.search(r"name:\s*faas\b", cluster[1])
        assert re.search(r"port:\s*6222\b", cluster[1])
        routes = set(re.findall(r"nats-route://([\w-]+):6222", cluster[1]))
        assert routes == set(NATS), routes
        assert re.search(r"^port:\s*4222\b", conf, re.MULTILINE)
        assert re.search(r"^http_port:\s*8222\b", conf, re.MULTILINE)
        # JetStream clustering needs a distinct server_name on each server.
        server_name = re.search(r"^server_name:\s*(\S+)", conf, re.MULTILINE)[1]
        if server_name.startswith("$"):
            server_name = svc["environment"][server_name[1:]]
        names.add(server_name)
        # A variable the config reads but the container lacks stops the server at start.
        missing = _env_references(conf) - set(svc.get("environment", {}))
        assert not missing, f"{name} lacks {missing}"
    assert len(names) == len(NATS)


def test_runtime_nodes_have_shared_memory_and_a_dockerfile():
    for name in NODES:
        svc = SERVICES[name]
        # The backbone every sandbox maps lives in /dev/shm: Docker's default is 64 MB.
        assert _size_bytes(svc["shm_size"]) > 64 * 1024 ** 2
        dockerfile = ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]
        assert dockerfile in DOCKERFILES, dockerfile
        assert svc["command"][0] == "up"
        assert svc["environment"]["FAAS_NATS_USER"] == "faas-node"
    for svc in _faas_services().values():
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()


def test_deploy_and_producer_log_in_as_their_users():
    deploy, producer = SERVICES["deploy"], SERVICES["producer"]
    assert deploy["command"][0] == "deploy" and deploy["restart"] == "on-failure"
    assert deploy["environment"]["FAAS_NATS_USER"] == "faas-admin"
    assert producer["environment"]["FAAS_NATS_USER"] == "producer"


def test_only_node_containers_keep_the_images_healthcheck():
    # The image's healthcheck pings the container's node: elsewhere it would never pass.
    for name, svc in _faas_services().items():
        runs_a_node = "entrypoint" not in svc and svc["command"][0] == "up"
        assert svc.get("healthcheck", {}).get("disable", False) is not runs_a_node, name


def test_nats_urls_name_the_cluster():
    urls = [svc["command"][svc["command"].index("--nats") + 1]
            for svc in _faas_services().values() if "--nats" in svc.get("command", [])]
    urls += [svc["environment"]["FAAS_NATS_URL"] for svc in _faas_services().values()]
    assert urls
    for url in urls:
        parts = [urlsplit(u) for u in url.split(",")]
        assert {(p.scheme, p.hostname, p.port) for p in parts} == {("nats", n, 4222) for n in NATS}, url


_COMMANDS = _service_commands() + _dockerfile_commands()


@pytest.mark.parametrize("argv", [argv for _, argv in _COMMANDS], ids=[name for name, _ in _COMMANDS])
def test_container_commands_parse(argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: unknown command or option (usage on stderr)
        pytest.fail(f"`faas {shlex.join(argv)}` does not parse (exit {exc.code})")


def test_every_runtime_service_command_is_checked():
    ids = {c[0].split(":")[0] for c in _service_commands()}
    assert {*NODES, "deploy", "producer"} <= ids


def test_compose_config_with_docker():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker is installed without the compose plugin")
    out = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# --- Dockerfiles ------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_non_root_with_healthcheck(dockerfile):
    instructions = _instructions(dockerfile)
    ops = [op for op, _ in instructions]
    assert ops.count("FROM") >= 2, "a builder stage and a runtime stage"
    final = instructions[len(ops) - 1 - ops[::-1].index("FROM"):]
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert [args for op, args in final if op == "HEALTHCHECK"]
    (entrypoint,) = [args for op, args in final if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["faas"]
    # The runtime stage takes the builder's venv, not the sources.
    assert any(op == "COPY" and args.startswith("--from=") for op, args in final)
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert re.search(r"\bFAAS_HOME=/var/lib/faas\b", env)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_the_build_context_sends(dockerfile):
    # .dockerignore is an allow-list: a COPY of anything it does not let through fails the build.
    allowed = {line[1:].strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for op, args in _instructions(dockerfile):
        if op != "COPY" or args.startswith("--from="):
            continue
        sources = [s for s in args.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is left out by .dockerignore"


def test_nodes_keep_faas_home_in_a_volume():
    for name in NODES:
        targets = [v.split(":")[1] for v in SERVICES[name]["volumes"]]
        assert "/var/lib/faas" in targets, f"{name} would rebuild its models on every start"


# --- NATS config, by the real nats-server --------------------------------------------------

def _password_env() -> dict[str, str]:
    return {**os.environ, **{var: "test-password" for var in _env_references(AUTH_CONF.read_text())}}


def test_auth_defines_the_three_users_with_passwords_from_the_environment():
    text = AUTH_CONF.read_text()
    assert set(re.findall(r"^\s*user:\s*([\w-]+)", text, re.MULTILINE)) == USERS
    assert _env_references(text) == {"FAAS_NODE_PASSWORD", "FAAS_ADMIN_PASSWORD", "FAAS_PRODUCER_PASSWORD"}


def test_auth_conf_is_valid_for_nats_server(tmp_path):
    conf = tmp_path / "server.conf"
    # nats-server resolves an include relative to the including file, even an absolute one.
    conf.write_text(f'port: 4222\njetstream {{store_dir: "{tmp_path / "js"}"}}\n'
                    f'include "{os.path.relpath(AUTH_CONF, tmp_path)}"\n')
    out = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], capture_output=True,
                         text=True, timeout=30, env=_password_env())
    assert out.returncode == 0, out.stdout + out.stderr


def test_cluster_conf_is_valid_for_nats_server():
    conf = _nats_conf("nats-1")
    env = {**_password_env(), **{k: str(v) for k, v in SERVICES["nats-1"]["environment"].items()
                                 if not str(v).startswith("${")}}
    out = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], capture_output=True,
                         text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stdout + out.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_the_compose_url_list_connects(tmp_path):
    """The containers get their servers as one comma-separated list (nats-py itself takes a
    Python list, and reads such a string as one bad URL): faas must split it. The first
    server of the list is down here, as one may be while the cluster starts."""
    compose_urls = SERVICES["producer"]["environment"]["FAAS_NATS_URL"].split(",")
    port, dead = _free_port(), _free_port()
    urls = ",".join(f"nats://127.0.0.1:{dead if i == 0 else port}" for i in range(len(compose_urls)))
    conf = tmp_path / "server.conf"
    conf.write_text(f'host: 127.0.0.1\nport: {port}\ninclude "{os.path.relpath(AUTH_CONF, tmp_path)}"\n')
    server = subprocess.Popen([nats_server_binary(), "-c", str(conf)], env=_password_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert server.poll() is None and time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)
        async with Client(urls, user="producer", password="test-password") as client:
            await client.nc.flush()
    finally:
        server.terminate()
        server.wait(10)
