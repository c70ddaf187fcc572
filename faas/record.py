"""The function record: a function as the platform passes it around, as plain data.

The SDK's `FunctionSpec` (which holds the handler itself) makes one with `record()`;
discovery prints it, a deploy stores it (less the paths that are local to the deployer), and
the catalog, the node, its pools and sandboxes serve from it. Whatever crosses a process
boundary comes back through `FunctionRecord.from_untrusted`, which checks again what the
SDK checked at declaration (the answer may come from user code, or from anyone who can
write the functions bucket) and names the first bad field.

A deployment (what `faas deploy` puts in the functions bucket, faas/deploy.py): `{"name",
"version", "deployed_at", "spec": {the function record less its local paths},
"code": {"file", "files": {name: digest}}, "backbone": {"fingerprint", "name", "path"} | None,
"adapter": {"files": {relative path: digest}} | None}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from faas.errors import SpecError
from faas.schedule import Cron
from faas.protocol import valid_function_name, valid_subject

# Where a function's generations run (README: "Where generation runs").
ENGINES = ("shared", "sandbox")
# The time-to-first-token a function promises unless it says otherwise.
DEFAULT_SLO_TTFT_S = 2.5

_MAX_PATH = 4096
_MAX_COUNT = 100_000
_MAX_SECONDS = 1e9


def positive_seconds(value: object) -> bool:
    """A finite number of seconds above zero (not a bool)."""
    # Compared, never converted: NaN fails both bounds, and an int too large for a float is
    # refused without an OverflowError.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < _MAX_SECONDS


def count(value: object) -> bool:
    """An integer of at least one (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_COUNT


def _path_or_none(value: object) -> bool:
    return value is None or isinstance(value, str) and 0 < len(value) < _MAX_PATH


@dataclass(frozen=True)
class FunctionRecord:
    """One function (the fields are `FunctionSpec`'s; see its docstring), plus where its code
    is (`source_file`, `handler`, `has_setup`) and, when a node serves it from a deploy, the
    deployed version (`deployed`)."""

    name: str
    source_file: str
    handler: str
    has_setup: bool
    backbone: str | None
    adapter: str | None
    timeout_s: float
    max_queue: int
    max_instances: int
    start_timeout_s: float
    slo_ttft_s: float
    max_batch: int
    triggers: tuple[str, ...]
    max_deliver: int
    results: bool
    openai: bool
    engine: str
    schedule: str | None = None
    env: tuple[tuple[str, str], ...] = ()  # settings, as environment variables of its sandboxes
    secrets: tuple[str, ...] = ()  # names of secrets its sandboxes get (faas/secrets.py)
    network: bool = False  # its sandboxes may use the network
    deployed: int | None = None

    @property
    def maps_backbone(self) -> bool:
        """Whether its sandboxes map the backbone (the paper's path) rather than generating
        in the node's engine or having no model."""
        return self.backbone is not None and self.engine == "sandbox"

    @property
    def on_engine(self) -> bool:
        """Whether its generations run in the node's generation engine for its backbone."""
        return self.backbone is not None and self.engine == "shared"

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data (JSON and msgpack), without `deployed`: what discovery
        prints and `from_untrusted` reads back."""
        data = asdict(self)
        del data["deployed"]
        data["triggers"] = list(self.triggers)
        data["env"] = dict(self.env)
        data["secrets"] = list(self.secrets)
        return data

    @classmethod
    def from_untrusted(cls, data: object, source_file: str | None = None) -> FunctionRecord:
        """The record `data` describes, checked field by field; SpecError naming the first
        field that is missing, extra or out of range. With `source_file`, the record must
        say that it is declared there (discovery of one file may not claim another's)."""
        if not isinstance(data, dict):
            raise SpecError(f"a function record is a map, not {type(data).__name__}")
        expected = {f.name for f in fields(cls)} - {"deployed"}
        extra = sorted(str(k)[:64] for k in set(data) - expected)
        if extra:
            raise SpecError(f"unknown field {extra[0]!r}")
        missing = sorted(expected - set(data) - set(_LATER))  # records from before those fields
        if missing:
            raise SpecError(f"field {missing[0]!r} is missing")
        checks = {
            "name": lambda v: isinstance(v, str) and valid_function_name(v),
            "source_file": lambda v: isinstance(v, str) and 0 < len(v) < _MAX_PATH
            and (source_file is None or v == source_file),
            "handler": lambda v: isinstance(v, str) and 0 < len(v) < _MAX_PATH,
            "has_setup": lambda v: isinstance(v, bool),
            "backbone": _path_or_none,
            "adapter": _path_or_none,
            "timeout_s": positive_seconds, "start_timeout_s": positive_seconds, "slo_ttft_s": positive_seconds,
            "max_queue": count, "max_instances": count, "max_batch": count, "max_deliver": count,
            "triggers": lambda v: isinstance(v, (list, tuple))
            and all(isinstance(t, str) and valid_subject(t) for t in v),
            "results": lambda v: isinstance(v, bool), "openai": lambda v: isinstance(v, bool),
            "engine": lambda v: isinstance(v, str) and v in ENGINES,
            "schedule": _schedule_or_none,
            "env": valid_env, "secrets": lambda v: isinstance(v, (list, tuple)) and len(v) <= 256
            and all(valid_name(s) for s in v),
            "network": lambda v: isinstance(v, bool),
        }
        data = {**_LATER, **data}
        for key, valid in checks.items():
            if not valid(data[key]):
                raise SpecError(f"field {key!r} is out of range: {str(data[key])[:100]!r}")
        if data["adapter"] is not None and data["backbone"] is None:
            raise SpecError("field 'adapter' needs a field 'backbone' (an adapter adapts a model)")
        return cls(**{**data, "triggers": tuple(data["triggers"]), "env": tuple(sorted(data["env"].items())),
                      "secrets": tuple(data["secrets"]),
                      "timeout_s": float(data["timeout_s"]), "start_timeout_s": float(data["start_timeout_s"]),
                      "slo_ttft_s": float(data["slo_ttft_s"])})


def decode_deployment(value: bytes) -> dict[str, Any]:
    """A deployment's record from the functions bucket (its function record, less the
    deployer's local paths, is `spec`), checked for the shape nodes rely on (the bucket may hold
    anything someone with write access to it put there). ValueError otherwise."""
    record = json.loads(value)
    if not (isinstance(record, dict) and isinstance(record.get("name"), str)
            and type(record.get("version")) is int and record["version"] >= 1
            and isinstance(record.get("spec"), dict) and isinstance(record.get("code"), dict)
            and isinstance(record["code"].get("files"), dict)
            and record["code"].get("file") in record["code"]["files"]
            and all(_plain_path(p) and _digest_like(d) for p, d in record["code"]["files"].items())
            and all("/" not in p for p in record["code"]["files"])
            and (record.get("adapter") is None
                 or isinstance(record["adapter"], dict) and isinstance(record["adapter"].get("files"), dict)
                 and all(_plain_path(p) and _digest_like(d) for p, d in record["adapter"]["files"].items()))
            and (record.get("backbone") is None
                 or isinstance(record["backbone"], dict)
                 and isinstance(record["backbone"].get("fingerprint"), str))):
        raise ValueError("not a function record")
    return record


_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")


def valid_name(name: object) -> bool:
    """A setting's or secret's name (an environment variable's): upper-case letters, digits
    and `_`, not a digit first."""
    return isinstance(name, str) and _ENV_NAME.fullmatch(name) is not None


# Fields added after records were first deployed: absent, they take these values.
_LATER: dict[str, Any] = {"schedule": None, "env": {}, "secrets": [], "network": False}
_MAX_ENV_BYTES = 64 << 10


def valid_env(value: object) -> bool:
    """Settings as environment variables: names as `valid_name`, text values, 64 KiB in all."""
    return (isinstance(value, dict) and all(valid_name(k) and isinstance(v, str) for k, v in value.items())
            and sum(len(k) + len(v) for k, v in value.items()) <= _MAX_ENV_BYTES)


def _schedule_or_none(value: object) -> bool:
    if value is None:
        return True
    try:
        Cron.parse(value)  # type: ignore[arg-type]
    except SpecError:
        return False
    return True


def _plain_path(path: object) -> bool:
    """A relative path inside its folder: no absolute path, no `..`, no empty part."""
    return (isinstance(path, str) and 0 < len(path) < 512 and not path.startswith("/")
            and all(part not in ("", ".", "..") for part in path.split("/")))


def _digest_like(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
