"""What each pre-load level costs and saves, measured: for one LoRA function of the bench model,
a sandbox is prepared to each level (COLD: none) and then serves one request; we record the
request's time to first token, the level it found, and the profile the node keeps (each
step's time, the memory a sandbox holds at each level). Both paths, each with its backbone
(and the engine) warm: `engine` (the function generates in the node's engine) and `sandbox`
(the paper's: the function's own sandbox maps the backbone and generates).

    python -m bench.levels [--device cpu|cuda] [--repeat 3] [--out results/levels.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator

from bench.models import build_model, write_functions
from faas.bundled import faas_home
from runtime.backbone.registry import BackboneRegistry
from runtime.engine.registry import EngineRegistry
from runtime.functions.catalog import load_catalog
from runtime.pool.leases import FunctionPool
from runtime.sandbox.handles import SandboxConfig
from runtime.sandbox.levels import STEPS, Level, Profiles, engine_key
from runtime.sandbox.spawn import Zygote


@dataclass
class NodeParts:
    """What a node serves functions with: the catalog, the zygotes (with torch, and light),
    the backbones and the engines (sandboxes keep this process's uid)."""

    catalog: Any
    zygote: Zygote
    light_zygote: Zygote
    backbones: BackboneRegistry
    engines: EngineRegistry

    def pool(self, name: str, profiles: Profiles | None = None, engine: bool = True,
             config: SandboxConfig | None = None, **overrides: Any) -> FunctionPool:
        """A pool of function `name` (its spec with `overrides`), generating in the engine
        or (not `engine`) in its own sandboxes, as a node would make it."""
        spec = next(s for s in self.catalog.specs if s.name == name)
        spec = replace(spec, engine="shared" if engine else "sandbox", **overrides)
        return FunctionPool(spec, config or SandboxConfig(), self.light_zygote if engine else self.zygote,
                            self.backbones, self.catalog.isolation[name], profiles or Profiles(self.backbones.device),
                            keep_alive_s=None, engines=self.engines)


@asynccontextmanager
async def node_parts(functions: Path, device: str) -> AsyncIterator[NodeParts]:
    """The parts of a node serving the functions in `functions`."""
    catalog = await load_catalog((functions,), None, False, False)
    backbones = BackboneRegistry(device, 600.0)
    parts = NodeParts(catalog, Zygote(1), Zygote(1, light=True), backbones,
                      EngineRegistry(backbones, keep_alive_s=600.0))
    parts.zygote.start()
    parts.light_zygote.start()
    try:
        yield parts
    finally:
        await parts.zygote.close()
        await parts.light_zygote.close()
        await parts.engines.close()
        await backbones.close()
        catalog.close()


async def prepared(pool: FunctionPool, level: Level, timeout_s: float = 300.0) -> None:
    """Prepare one sandbox of `pool` to `level` and wait until it is there and idle."""
    pool.prepare([level], 1)
    deadline = time.monotonic() + timeout_s
    while level > Level.COLD and (pool.state()["levels"] != [level.label] or pool.state()["starting"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no sandbox reached {level.label}: {pool.state()}")
        await asyncio.sleep(0.02)


async def measure(device: str, repeat: int, prompt_tokens: int) -> dict[str, Any]:
    model_dir = build_model(faas_home() / "bench-models", 1, "m200")
    functions = faas_home() / "bench-levels" / "functions"
    write_functions(functions, model_dir, ["fn00"])
    result: dict[str, Any] = {"device": device, "model": str(model_dir), "prompt_tokens": prompt_tokens,
                              "repeat": repeat, "paths": {}}
    async with node_parts(functions, device) as parts:
        [spec] = parts.catalog.specs
        for path in ("engine", "sandbox"):
            profiles = Profiles(device)
            rows: dict[str, list[dict[str, Any]]] = {level.label: [] for level in Level}
            started = time.monotonic()
            # Warm for every level's runs: the backbone, and on the engine path the engine.
            warm = await (parts.engines if path == "engine" else parts.backbones).acquire(spec.backbone)
            warm_s = time.monotonic() - started
            try:
                for _ in range(repeat):
                    for level in Level:
                        pool = parts.pool("fn00", profiles, engine=path == "engine")
                        try:
                            await prepared(pool, level)
                            pool.admit()
                            sent = time.monotonic()
                            served = await pool.serve("levels", {"prompt_tokens": prompt_tokens,
                                                                 "output_tokens": 1}, sent + 300)
                            assert served.result.first_token_at is not None
                            rows[level.label].append({
                                "found": served.level.label,
                                "ttft_ms": (served.result.first_token_at - sent) * 1000})
                        finally:
                            await pool.close()
            finally:
                (parts.engines if path == "engine" else parts.backbones).release(warm)  # type: ignore[arg-type]
            profile = profiles.of(engine_key(spec.backbone) if path == "engine" else spec.backbone)
            result["paths"][path] = {
                "warm_up_ms": warm_s * 1000,
                "levels": {label: {"found": sorted({r["found"] for r in runs}),
                                   "ttft_ms_median": statistics.median(r["ttft_ms"] for r in runs),
                                   "ttft_ms": [round(r["ttft_ms"], 1) for r in runs]}
                           for label, runs in rows.items()},
                "profile": profile.to_dict()["steps"],
                "saved_ms_by_profile": {step.label: round(profile.saved(step) * 1000, 1) for step in STEPS},
            }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.levels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results/levels.json"))
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.device, args.repeat, args.prompt_tokens))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'path':>8} {'found':>10} {'TTFT ms':>10} {'step ms':>10} {'host MiB':>10} {'device MiB':>10}")
    for path, measured in result["paths"].items():
        for level in Level:
            step = measured["profile"].get(level.label, {"ms": 0.0, "host_mib": 0.0, "device_mib": 0.0})
            print(f"{path:>8} {level.label:>10} {measured['levels'][level.label]['ttft_ms_median']:>10.1f} "
                  f"{step['ms']:>10.1f} {step['host_mib']:>10.1f} {step['device_mib']:>10.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
