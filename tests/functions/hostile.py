"""Functions that attack the node from inside their sandbox (tests/test_adversarial.py): they
lie about their memory, their level and their prefills, announce a huge frame, try to change
their own code and the node's state folder, and leak what their discovery saw into their
own names."""

import gc
import os
import struct
import sys
import time

from _attempts import attempt
from faas import function


def _wire():
    """The sandbox's socket to the node (any code in the process can find it)."""
    return next(o for o in gc.get_objects() if type(o).__name__ == "_Wire")


def lie(ctx) -> None:
    """Answer the loading step itself, first, claiming a petabyte; then report prefills
    that took thirty years, of no prompt, of a million prompts. (A frame that is not even
    well-formed, a NaN, say, gets its sandbox killed.)"""
    wire = _wire()
    wire.send({"type": "level", "level": 4, "ms": 1.0, "host_bytes": 10**15, "device_bytes": 10**15})
    for rows, ms in ((1, 1e12), (0, 1e12), (10**6, 1e12), (2, 1e12)):
        wire.send({"type": "prefill", "rows": rows, "tokens": 1, "ms": ms})


@function(name="liar", setup=lie, timeout_s=30)
def liar(event: dict, ctx) -> dict:
    return {"ok": True}


def claim_another_level(ctx) -> None:
    _wire().send({"type": "level", "level": 2, "ms": 1.0, "device_bytes": 0})


@function(name="misleveled", setup=claim_another_level, timeout_s=30)
def misleveled(event: dict, ctx) -> dict:
    return {"ok": True}


@function(name="garbler", timeout_s=30)
def garbler(event: dict, ctx) -> dict:
    """Answers its own request first, with a result whose fields are not what they must be."""
    _wire().send({"type": "result", "request_id": ctx.request_id, "output": "forged",
                  "usage": {"first_token_at": "yesterday", "tokens_out": -1}})
    time.sleep(5)
    return {"ok": True}


HINTS = {"nan": float("nan"), "inf": float("inf"), "huge": 1e300, "year": 3.15e7, "negative": -5.0,
         "text": "soon", "true": True}


@function(name="hinter", timeout_s=30)
def hinter(event: dict, ctx) -> dict:
    """Answers its own request with a 503 carrying the retry hint the caller names (the
    engine's hint, as a sandbox relays it, is the sandbox's word)."""
    _wire().send({"type": "error", "request_id": ctx.request_id, "error": {
        "type": "Overloaded", "message": "busy", "overloaded": True,
        "retry_after_s": HINTS[event["hint"]]}})
    return {"ok": True}  # comes after the 503 on the same socket: dropped


@function(name="flooder", timeout_s=60, max_batch=1)
def flooder(event: dict, ctx) -> dict:
    """`huge_frame`: announce a frame of 200 MiB on its socket, then hang."""
    if event.get("huge_frame"):
        wire = _wire()
        with wire._lock:
            wire.sock.sendall(struct.pack(">I", 200 << 20) + b"\x81")
        time.sleep(60)
    return {"ok": True}


@function(name="threadbomb", timeout_s=60)
def threadbomb(event: dict, ctx) -> dict:
    """Starts threads until it may not (at most `most`), then lets them go."""
    import threading

    done = threading.Event()
    started = 0
    try:
        for _ in range(int(event.get("most", 100_000))):
            threading.Thread(target=done.wait, daemon=True).start()
            started += 1
    except RuntimeError:
        pass
    finally:
        done.set()
    return {"started": started}


@function(name="deepline", timeout_s=30)
def deepline(event: dict, ctx) -> dict:
    """Writes a log line nested too deep to parse, straight to its output, then a marker."""
    os.write(1, b'{"req": "x", "a": ' + b"[" * 3000 + b"]" * 3000 + b"}\n")
    print(event.get("marker"), flush=True)
    return {"ok": True}


def _fill_tmp() -> None:
    with open("/tmp/filler", "wb") as out:
        for _ in range(128):  # 128 MiB
            out.write(b"\0" * (1 << 20))


@function(name="selfwriter", timeout_s=60)
def selfwriter(event: dict, ctx) -> dict:
    """Tries to change its own code, its folder and the node's state folder, and to fill
    its private /tmp."""
    here = os.path.dirname(os.path.abspath(__file__))
    home = os.environ["FAAS_HOME"]
    return {
        "rewrite_own_code": attempt(lambda: open(os.path.abspath(__file__), "ab").close()),
        "write_own_folder": attempt(lambda: open(os.path.join(here, "dropped.py"), "wb").close()),
        "write_faas_home": attempt(lambda: open(os.path.join(home, "dropped"), "wb").close()),
        "fill_tmp": attempt(_fill_tmp),
    }


@function(name="eventid", triggers=["events.adversarial.id"], results=True, timeout_s=30)
def eventid(event: dict, ctx) -> dict:
    """Says which request id it runs under (in its log, where a test can find it), then
    takes its time."""
    print(f"event {event.get('run')} runs as {ctx.request_id}", flush=True)
    time.sleep(float(event.get("s", 0)))
    return {"run": event.get("run"), "request_id": ctx.request_id}


@function(name="bigout", triggers=["events.adversarial.big"], results=True, max_deliver=3, timeout_s=30)
def bigout(event: dict, ctx) -> dict:
    return {"blob": "x" * int(event.get("n", 0)), "delivered": ctx.event_info.delivered}


@function(name="chatty", timeout_s=60, max_batch=4)
def chatty(event: dict, ctx) -> dict:
    for i in range(int(event.get("lines", 1))):
        print(f"{event.get('say', 'chatter')} {i}")
    sys.stdout.flush()
    return {"lines": event.get("lines", 1)}


# Discovery imports this file too: what it sees decides this function's name. A discovery
# that saw the node's secret (or ran with the node's uid) would serve another name.
_SAW = "saw-secret" if {"FAAS_TEST_NODE_SECRET", "HF_TOKEN"} & set(os.environ) else "clean"
print(f"hostile.py imported by uid {os.getuid()}", file=sys.stderr)


@function(name=f"discovery-{_SAW}", timeout_s=10)
def discovery_env(event: dict, ctx) -> dict:
    return {"saw": _SAW}
