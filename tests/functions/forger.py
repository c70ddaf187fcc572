"""Functions on the engine path that attack their engine connection from inside their
handler: what a hostile function can reach is its own sandbox's objects, so it finds the
connection the node handed it and sends what the SDK never would."""

import gc
import json
import os
import sys
import threading

from pathlib import Path

from faas import function
from faas.bundled import adapter_path, model_path


def _connection():
    from runtime.sandbox.engine_client import EngineConnection

    return next(o for o in gc.get_objects() if isinstance(o, EngineConnection))


def _outcome(action) -> str:
    try:
        action()
    except Exception as exc:  # what the engine answered, as the SDK raises it
        return f"refused {getattr(exc, 'code', '?')}: {type(exc).__name__}"
    return "ALLOWED"


def _own(name: str):
    data = (Path(adapter_path("summarize")) / name).read_bytes()
    return json.loads(data) if name.endswith(".json") else data


@function(name="lookout", backbone=model_path(), adapter=adapter_path("summarize"), timeout_s=60)
def lookout(event: dict, ctx) -> dict:
    """What an engine-path sandbox holds: no torch, no backbone descriptor or mapping. With
    `crash`, the process dies in the middle of a generation."""
    if event.get("crash"):
        threading.Thread(target=lambda: ctx.generate("hello", max_new_tokens=400, ignore_eos=True)).start()
        threading.Event().wait(0.5)
        os._exit(3)
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if "faas-backbone" in line]
    return {"torch": "torch" in sys.modules, "backbone_fds": sum("faas-backbone" in f for f in fds),
            "backbone_mappings": len(mapped), "text": ctx.generate("hello", max_new_tokens=4).text}


@function(name="forger", backbone=model_path(), adapter=adapter_path("summarize"), timeout_s=60, max_batch=4)
def forger(event: dict, ctx) -> dict:
    conn = _connection()
    gen = {"type": "gen", "prompt": "hello", "max_new_tokens": 2}
    results = {
        # Name another function's adapter for its rows, or claim another function.
        "forge_adapter": _outcome(lambda: conn._ask({**gen, "adapter": "sql"}, "done")),
        "forge_function": _outcome(lambda: conn._ask({**gen, "function": "sql"}, "done")),
        # Swap its adapter for another function's weights (it may read them here: tests share
        # one folder of adapters).
        "restage_other_adapter": _outcome(lambda: conn.stage(adapter_path("sql"))),
        # Its own weights as a LoRA variant the engine's batched step does not compute.
        "stage_variant": _outcome(lambda: conn._ask({"type": "stage", "config": {**_own("adapter_config.json"),
                                                                                  "use_dora": True},
                                                     "weights": _own("adapter_model.safetensors")}, "staged")),
        "huge_max_new_tokens": _outcome(lambda: conn._ask({**gen, "max_new_tokens": 10**9}, "done")),
        "bad_option": _outcome(lambda: conn._ask({**gen, "temperature": "hot"}, "done")),
        "bad_chat": _outcome(lambda: conn._ask({"type": "chat", "messages": [{"role": 1, "x": "y"}]}, "chat")),
    }
    # More generations at once than its max_batch: the ones past its share are refused.
    outcomes: list[str] = []
    threads = [threading.Thread(target=lambda: outcomes.append(_outcome(lambda: conn._ask(
        {**gen, "max_new_tokens": 24, "ignore_eos": True}, "done")))) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results["flood_refused"] = sum(o.startswith("refused 503") for o in outcomes)
    results["flood_served"] = outcomes.count("ALLOWED")
    if event.get("garbage"):  # bytes that are no frame: the engine cuts this connection off
        with conn._send_lock:
            conn._sock.sendall(b"\xff\xff\xff\xff" + b"x" * 64)
        results["after_garbage"] = _outcome(lambda: ctx.generate("hello", max_new_tokens=2))
    return results
