"""API keys for the HTTP gateway (`faas gateway --api-keys FILE`).

The file is JSON: `{"keys": [{"name": "team-a", "key": "sk-...", "functions": ["support",
"sql"]}, {"name": "ops", "key": "...", "functions": ["*"], "adapters": true}]}` (`adapters`:
the key may load and unload LoRA adapters, vLLM's `/v1/load_lora_adapter`). A caller sends its key as
OpenAI clients do (`Authorization: Bearer <key>`): no key or an unknown one is a 401, a
function the key may not call a 403, as OpenAI's API answers them. Keys are compared by
their SHA-256, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from faas.errors import FaasError

_MIN_KEY = 16


class Unauthorized(FaasError):
    """No API key, or one the gateway does not know (401)."""

    code = 401


class Forbidden(FaasError):
    """The key may not call that function (403)."""

    code = 403


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    functions: frozenset[str]  # "*": every function
    adapters: bool = False  # may load and unload adapters (vLLM's dynamic LoRA API)

    def may_call(self, function: str) -> bool:
        return "*" in self.functions or function in self.functions


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[ApiKey, ...]

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        """The keys of `path`; FaasError naming what is wrong with it."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise FaasError(f"cannot read the API keys in {path}: {exc}") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise FaasError(f"{path}: expected {{\"keys\": [{{\"name\", \"key\", \"functions\"}}, ...]}}")
        keys = []
        for i, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("key"), str)
                    and len(entry["key"]) >= _MIN_KEY and isinstance(entry.get("functions"), list)
                    and all(isinstance(f, str) for f in entry["functions"])):
                raise FaasError(f"{path}: key {i + 1} needs a \"key\" of at least {_MIN_KEY} characters "
                                "and a list of \"functions\" (\"*\": all)")
            keys.append(ApiKey(str(entry.get("name", f"key {i + 1}")),
                               hashlib.sha256(entry["key"].encode()).digest(), frozenset(entry["functions"]),
                               entry.get("adapters") is True))
        return cls(tuple(keys))

    def check(self, authorization: str | None) -> ApiKey:
        """The key an `Authorization` header carries; Unauthorized otherwise."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("You didn't provide an API key: send it as 'Authorization: Bearer KEY'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for key in self.keys:  # every key compared: the time says nothing about which matched
            if hmac.compare_digest(key.digest, digest):
                found = key
        if found is None:
            raise Unauthorized("Incorrect API key provided")
        return found
