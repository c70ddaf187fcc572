"""Reproducible benchmarks: programs that print a table and write JSON (and PNG plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(out: Path, result: dict[str, Any]) -> None:
    """Write a benchmark's result as JSON to `out` (its folder made) and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
