"""NATS credentials, the same for every faas command, the node and `Client`.

A NATS server with authorization on refuses anyone without a login. Each command takes
`--user/--password`, `--token`, `--creds FILE` (a JWT + nkey seed file, as `nsc` writes)
or `--nkey-seed FILE`, each defaulting to an environment variable (`FAAS_NATS_USER`,
`FAAS_NATS_PASSWORD`, `FAAS_NATS_TOKEN`, `FAAS_NATS_CREDS`, `FAAS_NATS_NKEY_SEED`) so
containers and CI pass secrets without putting them on a command line. A login in the
URL (`nats://user:password@host:4222`) works too; nkey logins need the `nkeys` package
(`pip install faas-lora[nkeys]`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from faas.connection import connect as connect_sized
from faas.errors import FaasError
from faas.localnode import local_credentials
from faas.protocol import NODE_INBOX_PREFIX

_ENV = {"user": "FAAS_NATS_USER", "password": "FAAS_NATS_PASSWORD", "token": "FAAS_NATS_TOKEN",
        "creds": "FAAS_NATS_CREDS", "nkey_seed": "FAAS_NATS_NKEY_SEED",
        "inbox_prefix": "FAAS_NATS_INBOX_PREFIX"}
# nats-py's names for them.
_OPTION = {"user": "user", "password": "password", "token": "token", "creds": "user_credentials",
           "nkey_seed": "nkeys_seed", "inbox_prefix": "inbox_prefix"}


@dataclass(frozen=True)
class Credentials:
    """One NATS login; empty when the server needs none (or the URL carries it)."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    nkey_seed: str | None = None
    # Where replies reach this client (`_INBOX` by default): a server config can then let
    # each user subscribe to its own prefix only, so no client reads another's replies.
    inbox_prefix: str | None = None

    def __post_init__(self) -> None:
        kinds = [bool(self.user or self.password), bool(self.token), bool(self.creds),
                 bool(self.nkey_seed)]
        if sum(kinds) > 1:
            raise ValueError("give one NATS login: user/password, token, creds file or nkey seed")
        if bool(self.user) != bool(self.password):
            raise ValueError("a NATS user needs a password (and a password a user)")

    def __bool__(self) -> bool:
        """Whether it carries a login (the inbox prefix is not one)."""
        return any(getattr(self, f.name) for f in fields(self) if f.name != "inbox_prefix")

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`."""
        return {_OPTION[f.name]: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    @classmethod
    def from_env(cls) -> Credentials:
        return cls(**{name: os.environ.get(var) or None for name, var in _ENV.items()})


def servers(url: str) -> list[str]:
    """`nats://a:4222,nats://b:4222` as the list nats-py wants (it reads the string as one
    URL): containers and clusters pass every server, any of which may be down."""
    return [part.strip() for part in url.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--user`, `--password`, `--token`, `--creds`, `--nkey-seed`, `--inbox-prefix` (defaults:
    the environment)."""
    group = parser.add_argument_group("NATS login (defaults from FAAS_NATS_* variables)")
    for name, var in _ENV.items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"nats_{name}", default=os.environ.get(var),
                           metavar="FILE" if name in ("creds", "nkey_seed") else name.upper().replace("_", "-"),
                           help=f"(env {var})")


def from_args(args: argparse.Namespace) -> Credentials:
    try:
        return Credentials(**{name: getattr(args, f"nats_{name}") or None for name in _ENV})
    except ValueError as exc:
        raise SystemExit(f"faas: {exc}") from None


async def connect(url: str, credentials: Credentials, state_dir: Path | None = None,
                  **options: Any) -> NATS:
    """A one-shot command's connection for operator work (deploys, JetStream state): with
    the given login, else the embedded server's node login when this user can read it (a
    local admin), else none. Fails at once when the server cannot be reached."""
    local = {} if credentials else local_credentials(state_dir)
    login = {**local, **credentials.options()}
    if local and "inbox_prefix" not in login:  # the node's login: replies only it may read
        login["inbox_prefix"] = NODE_INBOX_PREFIX
    errors: list[Exception] = []

    async def first_error(exc: Exception) -> None:
        # One line each (nats-py's default logs a traceback), e.g. a permission the login
        # lacks, which the server reports apart from the request it then lets time out.
        if not errors or str(errors[-1]) != str(exc):
            print(f"nats: {exc}", file=sys.stderr)
        errors.append(exc)

    try:
        return await connect_sized(servers(url), max_reconnect_attempts=1, connect_timeout=2,
                                   error_cb=first_error, **login, **options)
    except (nats.errors.Error, OSError) as exc:
        cause = f" ({errors[0]})" if errors and errors[0] is not exc else ""
        raise FaasError(f"cannot connect to NATS at {url}: {exc}{cause}") from None
