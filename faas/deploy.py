"""Deployed functions in NATS: `faas deploy`, `faas rm`, `faas rollback`.

A deploy writes each function as one record in the JetStream key-value bucket
`faas_functions` (key: the function's name) and its files into the object store
`faas_artifacts`, one object per file named by the SHA-256 of its bytes (so a file shared
by versions or functions is stored once, and a node checks what it downloads). Every put of
a key is a new version; the bucket's history keeps the earlier ones, so a rollback puts an
earlier record back. Nodes watch the bucket and serve what it holds (runtime/node/deployments.py).

A deployment's record (what the bucket holds) is faas/record.py's `decode_deployment`.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
    ObjectNotFoundError,
)

from faas import protocol, streams
from faas.artifacts import adapter_problems, model_fingerprint
from faas.errors import BadRequest, FunctionNotFound, Overloaded
from faas.record import FunctionRecord, decode_deployment

# Versions kept per function (the most a JetStream KV bucket keeps).
HISTORY = 64
# Fields of a discovered spec that hold this machine's paths: a record carries files and
# fingerprints instead.
_LOCAL_FIELDS = ("source_file", "backbone", "adapter")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inside_folder(path: Path, folder: Path | None = None) -> Path:
    """`path` resolved, refused (BadRequest) when it is a link that leaves `folder` (by
    default its own folder): a deploy ships what the folder holds, not what it points at."""
    folder = (folder or path.absolute().parent).resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(folder):
        raise BadRequest(f"{path} links outside {folder}: a deploy takes only files inside it")
    return resolved


_ADAPTER_FUNCTION = '''"""{name}: a LoRA adapter deployed as data (`faas deploy --adapter`): its handler
continues a prompt; with openai=True the gateway serves it as an OpenAI model too."""

from faas import BadRequest, function


@function(name={name!r}, backbone={backbone!r}, adapter="adapter", openai={openai!r})
def handler(event: dict, ctx) -> dict:
    prompt, max_tokens = event.get("prompt"), event.get("max_tokens", 64)
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("the event needs a 'prompt' (text)")
    if type(max_tokens) is not int or not 1 <= max_tokens <= 4096:
        raise BadRequest("'max_tokens' must be an integer from 1 to 4096")
    r = ctx.generate(prompt, max_new_tokens=max_tokens, stream=True)
    return {{"text": r.text, "finish_reason": r.finish_reason}}
'''


def adapter_function(name: str, adapter: Path, backbone: Path, openai: bool, into: Path) -> Path:
    """A function folder (in `into`) serving the LoRA adapter folder `adapter` on `backbone`
    with a default handler: what `faas deploy --adapter` deploys, no Python file needed."""
    if not protocol.valid_function_name(name):
        raise BadRequest(f"invalid function name {name!r}")
    if not (backbone / "config.json").is_file():
        raise BadRequest(f"backbone {str(backbone)!r} is not a model folder (no config.json)")
    if not (adapter / "adapter_config.json").is_file():
        raise BadRequest(f"adapter {str(adapter)!r} is not a peft adapter folder (no adapter_config.json)")
    folder = into / name
    folder.mkdir(parents=True)
    shutil.copytree(adapter, folder / "adapter", symlinks=True)  # links are refused by package()
    (folder / f"{name.replace('-', '_')}.py").write_text(
        _ADAPTER_FUNCTION.format(name=name, backbone=str(backbone.resolve()), openai=openai))
    return folder


def package(spec: FunctionRecord) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The record of one discovered function spec and the files it needs (by digest).
    Raises BadRequest when its adapter cannot be deployed for its backbone, or when a file
    it would ship is a link to something outside its folder."""
    source = Path(spec.source_file)
    blobs: dict[str, bytes] = {}

    def add(path: Path, folder: Path) -> str:
        data = inside_folder(path, folder).read_bytes()
        blobs[key := digest(data)] = data
        return key

    # The whole folder's Python files: a function file may import its siblings.
    code = {p.name: add(p, source.parent) for p in sorted(source.parent.glob("*.py"))}
    record: dict[str, Any] = {
        "name": spec.name,
        "spec": {k: v for k, v in spec.to_dict().items() if k not in _LOCAL_FIELDS},
        "code": {"file": source.name, "files": code},
        "backbone": None, "adapter": None,
    }
    if spec.backbone is not None:
        backbone = Path(spec.backbone)
        if not (backbone / "config.json").is_file():
            raise BadRequest(f"{spec.name}: backbone {spec.backbone!r} is not a local model "
                             "folder: a deploy names its base model by the fingerprint of its config")
        record["backbone"] = {"fingerprint": model_fingerprint(backbone), "name": backbone.name,
                              "path": str(backbone)}
    if spec.adapter is not None:
        adapter = Path(spec.adapter)
        problems = adapter_problems(adapter, Path(spec.backbone))
        if problems:
            raise BadRequest(f"{spec.name}: adapter {str(adapter)!r} cannot be deployed: "
                             + "; ".join(problems))
        record["adapter"] = {"files": {str(p.relative_to(adapter)): add(p, adapter)
                                       for p in sorted(adapter.rglob("*")) if p.is_file()}}
    return record, blobs


async def buckets(nc: NATS) -> tuple[Any, Any]:
    """The functions bucket and the artifacts object store (created if missing)."""
    js = nc.jetstream()
    kv = await streams.key_value(js, "functions", protocol.FUNCTIONS_BUCKET, history=HISTORY)
    return kv, await streams.object_store(js)


async def _versions(kv: Any, name: str) -> tuple[list[dict[str, Any] | None], int]:
    """Every version of `name` kept (oldest first; None for a removal; entries that are not
    records are skipped) and the key's last revision (0: never written)."""
    for attempt in range(4):
        try:
            entries = await kv.history(name)
            break
        except NoKeysError:
            # nats-py's history watch can end before its first message arrives; an empty
            # history of a key that exists is that race, not an answer.
            try:
                await kv.get(name)
            except KeyNotFoundError as exc:
                if exc.entry is None:  # never written (a removed key has a marker entry)
                    return [], 0
            await asyncio.sleep(0.05 * (attempt + 1))
    else:
        raise Overloaded(f"JetStream did not return the versions of {name}: try again")
    versions: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry.operation is not None or not entry.value:
            versions.append(None)
            continue
        try:
            versions.append(decode_deployment(entry.value))
        except ValueError:
            continue
    return versions, entries[-1].revision


async def _put(kv: Any, name: str, record: dict[str, Any], revision: int) -> None:
    """Write `record` only if nobody wrote `name` since `revision` (two deployers at once:
    one of them fails and says so, instead of both getting the same version number)."""
    try:
        if revision:
            await kv.update(name, json.dumps(record).encode(), last=revision)
        else:
            await kv.create(name, json.dumps(record).encode())
    except (KeyWrongLastSequenceError, BadRequestError):
        raise Overloaded(f"{name} was deployed by someone else meanwhile: try again") from None


def deployer(login_user: str | None) -> str:
    """Who deploys, as a version records it: the NATS login's user where there is one, else
    the local user, at this host."""
    try:
        local = getpass.getuser()
    except (KeyError, OSError):  # a uid without a name (a container)
        local = f"uid {os.getuid()}"
    return f"{login_user or local}@{socket.gethostname()}"


def record_digest(record: dict[str, Any]) -> str:
    """What a version is made of, in 12 hex digits: its settings and the SHA-256 of each of
    its files (the same code and adapter give the same digest, whoever deployed them)."""
    content = {k: record.get(k) for k in ("spec", "code", "adapter", "backbone")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


async def deploy(nc: NATS, records: list[tuple[dict[str, Any], dict[str, bytes]]],
                 deployed_by: str | None = None) -> list[dict[str, Any]]:
    """Store the files, then put each record as a new version (skipped when it equals the
    current one), noting `deployed_by`. Returns one row per function: name, version,
    changed."""
    kv, store = await buckets(nc)
    for _record, blobs in records:
        for key, data in blobs.items():
            try:
                await store.get_info(key)
            except ObjectNotFoundError:
                await store.put(key, data)
    rows = []
    for record, _blobs in records:
        versions, revision = await _versions(kv, record["name"])
        current = versions[-1] if versions else None
        if current is not None and record_digest(current) == record_digest(record):
            rows.append({"name": record["name"], "version": current["version"], "changed": False})
            continue
        version = 1 + max((v["version"] for v in versions if v), default=0)
        await _put(kv, record["name"], {**record, "version": version, "deployed_at": time.time(),
                                        **({"deployed_by": deployed_by} if deployed_by else {})}, revision)
        rows.append({"name": record["name"], "version": version, "changed": True})
    return rows


async def remove(nc: NATS, name: str) -> None:
    """Stop serving `name` everywhere (its versions stay for a rollback), and drop its place
    in the events stream: events published from now on wait for no one (a rollback starts
    it again from the events published after it)."""
    kv, _ = await buckets(nc)
    try:
        await kv.get(name)
    except KeyNotFoundError:
        raise FunctionNotFound(f"no deployed function named {name!r}") from None
    await kv.delete(name)
    try:
        await nc.jetstream().delete_consumer(protocol.EVENTS_STREAM, protocol.consumer_name(name))
    except NotFoundError:  # it had no triggers, or no node ever consumed them
        pass


async def rollback(nc: NATS, name: str, to: int | None = None,
                   deployed_by: str | None = None) -> dict[str, Any]:
    """Serve version `to` again, by default the one before the current one (after a
    removal: the last one served). Returns the record now current."""
    kv, _ = await buckets(nc)
    versions, revision = await _versions(kv, name)
    kept = [v for v in versions if v]
    if not kept:
        raise FunctionNotFound(f"no deployed function named {name!r}")
    current = versions[-1]
    if to is not None:
        chosen = [v for v in kept if v["version"] == to]
        if not chosen:
            raise BadRequest(f"{name} has no version {to} (kept: "
                             f"{', '.join(map(str, sorted({v['version'] for v in kept})))})")
        if current is not None and current["version"] == to:
            raise BadRequest(f"version {to} of {name} is live already")
        earlier = chosen[-1]
    elif current is None:
        earlier = kept[-1]
    else:
        older = [v for v in kept if v["version"] < current["version"]]
        if not older:
            raise BadRequest(f"{name} has no version before {current['version']}")
        earlier = max(older, key=lambda v: v["version"])
    record = {**earlier, "deployed_at": time.time(),
              "rolled_back_from": current["version"] if current else None,
              **({"deployed_by": deployed_by} if deployed_by else {})}
    await _put(kv, name, record, revision)
    return record


async def versions(nc: NATS, name: str) -> list[dict[str, Any]]:
    """The versions of `name` the bucket keeps, oldest first: number, when it was first
    deployed and by whom (where known), its digest, whether it is live, and when it was
    last made live by a rollback."""
    kv, _ = await buckets(nc)
    history, _ = await _versions(kv, name)
    if not any(history):
        raise FunctionNotFound(f"no deployed function named {name!r}")
    live = history[-1]["version"] if history[-1] else None
    rows: dict[int, dict[str, Any]] = {}
    for entry in filter(None, history):
        row = rows.setdefault(entry["version"], {
            "version": entry["version"], "deployed_at": entry.get("deployed_at"),
            "deployed_by": entry.get("deployed_by"), "digest": record_digest(entry),
            "live": entry["version"] == live, "rolled_back_at": None})
        if "rolled_back_from" in entry:  # made live again by a rollback
            row["rolled_back_at"] = entry.get("deployed_at")
    return [rows[v] for v in sorted(rows)]


async def deployed(nc: NATS) -> list[dict[str, Any]]:
    """The current record of every deployed function."""
    try:
        kv = await nc.jetstream().key_value(protocol.FUNCTIONS_BUCKET)
    except BucketNotFoundError:
        return []
    try:
        names = await kv.keys()
    except NoKeysError:
        return []
    records = []
    for name in sorted(names):
        try:
            records.append(decode_deployment((await kv.get(name)).value))
        except (KeyNotFoundError, ValueError):
            continue
    return records
