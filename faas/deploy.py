"""Deployed functions in NATS: `faas deploy`, `faas rm`, `faas rollback`.

A deploy writes each function as one record in the JetStream key-value bucket
`faas_functions` (key: the function's name) and its files into the object store
`faas_artifacts`, one object per file named by the SHA-256 of its bytes (so a file shared
by versions or functions is stored once, and a node checks what it downloads). Every put of
a key is a new version; the bucket's history keeps the earlier ones, so a rollback puts an
earlier record back. Nodes watch the bucket and serve what it holds (runtime/deployed.py).

A record: `{"name", "version", "deployed_at", "spec": {timeouts, batching, triggers...},
"code": {"file", "files": {name: digest}}, "backbone": {"fingerprint", "name", "path"} | None,
"adapter": {"files": {relative path: digest}} | None}`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError, ObjectNotFoundError

from faas import protocol
from faas.artifacts import adapter_problems, model_fingerprint
from faas.errors import BadRequest, FunctionNotFound

# Versions kept per function (the most a JetStream KV bucket keeps).
HISTORY = 64
# Fields of a discovered spec that hold this machine's paths: a record carries files and
# fingerprints instead.
_LOCAL_FIELDS = ("source_file", "backbone", "adapter")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The record of one discovered function spec and the files it needs (by digest).
    Raises BadRequest when its adapter cannot be deployed for its backbone."""
    source = Path(spec["source_file"])
    blobs: dict[str, bytes] = {}

    def add(path: Path) -> str:
        data = path.read_bytes()
        blobs[key := digest(data)] = data
        return key

    # The whole folder's Python files: a function file may import its siblings.
    code = {p.name: add(p) for p in sorted(source.parent.glob("*.py"))}
    record: dict[str, Any] = {
        "name": spec["name"],
        "spec": {k: v for k, v in spec.items() if k not in _LOCAL_FIELDS},
        "code": {"file": source.name, "files": code},
        "backbone": None, "adapter": None,
    }
    if spec["backbone"] is not None:
        backbone = Path(spec["backbone"])
        if not (backbone / "config.json").is_file():
            raise BadRequest(f"{spec['name']}: backbone {spec['backbone']!r} is not a local model "
                             "folder: a deploy names its base model by the fingerprint of its config")
        record["backbone"] = {"fingerprint": model_fingerprint(backbone), "name": backbone.name,
                              "path": str(backbone)}
    if spec["adapter"] is not None:
        adapter = Path(spec["adapter"])
        problems = adapter_problems(adapter, Path(spec["backbone"]))
        if problems:
            raise BadRequest(f"{spec['name']}: adapter {str(adapter)!r} cannot be deployed: "
                             + "; ".join(problems))
        record["adapter"] = {"files": {str(p.relative_to(adapter)): add(p)
                                       for p in sorted(adapter.rglob("*")) if p.is_file()}}
    return record, blobs


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def content(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k not in ("version", "deployed_at", "rolled_back_from")}
    return content(a) == content(b)


async def _buckets(nc: NATS) -> tuple[Any, Any]:
    js = nc.jetstream()
    kv = await js.create_key_value(bucket=protocol.FUNCTIONS_BUCKET, history=HISTORY)
    store = await js.create_object_store(protocol.ARTIFACTS_BUCKET)
    return kv, store


def decode_record(value: bytes) -> dict[str, Any]:
    return json.loads(value)


async def _versions(kv: Any, name: str) -> list[dict[str, Any]]:
    """Every version of `name` kept (oldest first), with None for a removal."""
    try:
        entries = await kv.history(name)
    except NoKeysError:
        return []
    return [decode_record(e.value) if e.value and e.operation is None else None for e in entries]


async def deploy(nc: NATS, records: list[tuple[dict[str, Any], dict[str, bytes]]]) -> list[dict[str, Any]]:
    """Store the files, then put each record as a new version (skipped when it equals the
    current one). Returns one row per function: name, version, changed."""
    kv, store = await _buckets(nc)
    for _record, blobs in records:
        for key, data in blobs.items():
            try:
                await store.get_info(key)
            except ObjectNotFoundError:
                await store.put(key, data)
    rows = []
    for record, _blobs in records:
        versions = await _versions(kv, record["name"])
        current = versions[-1] if versions else None
        if current is not None and _same(current, record):
            rows.append({"name": record["name"], "version": current["version"], "changed": False})
            continue
        version = 1 + max((v["version"] for v in versions if v), default=0)
        await kv.put(record["name"], json.dumps({**record, "version": version,
                                                 "deployed_at": time.time()}).encode())
        rows.append({"name": record["name"], "version": version, "changed": True})
    return rows


async def remove(nc: NATS, name: str) -> None:
    """Stop serving `name` everywhere (its versions stay for a rollback)."""
    kv, _ = await _buckets(nc)
    try:
        await kv.get(name)
    except KeyNotFoundError:
        raise FunctionNotFound(f"no deployed function named {name!r}") from None
    await kv.delete(name)


async def rollback(nc: NATS, name: str) -> dict[str, Any]:
    """Serve the version before the current one again (after a removal: the last one
    served). Returns the record now current."""
    kv, _ = await _buckets(nc)
    versions = await _versions(kv, name)
    kept = [v for v in versions if v]
    if not kept:
        raise FunctionNotFound(f"no deployed function named {name!r}")
    current = versions[-1]
    if current is None:
        earlier = kept[-1]
    else:
        older = [v for v in kept if v["version"] < current["version"]]
        if not older:
            raise BadRequest(f"{name} has no version before {current['version']}")
        earlier = max(older, key=lambda v: v["version"])
    record = {**earlier, "deployed_at": time.time(),
              "rolled_back_from": current["version"] if current else None}
    await kv.put(name, json.dumps(record).encode())
    return record


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
            records.append(decode_record((await kv.get(name)).value))
        except KeyNotFoundError:
            continue
    return records
