"""A handler that tries everything a function must not be able to do, and reports what
happened to each attempt instead of failing, so a test can check every one."""

import mmap
import os
import socket

from _attempts import attempt
from faas import function
from faas.bundled import adapter_path, model_path


def backbone_fd() -> int:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "memfd:faas-backbone" in os.readlink(f"/proc/self/fd/{fd}"):
                return int(fd)
        except OSError:
            continue
    raise RuntimeError("no backbone descriptor")


@function(name="intruder", backbone=model_path(), adapter=adapter_path("summarize"), timeout_s=60,
          engine="sandbox")
def intruder(event: dict, ctx) -> dict:
    fd = backbone_fd()
    host, port = event["nats"].removeprefix("nats://").split(":")
    return {
        "uid": os.getuid(),
        "write_model_file": attempt(lambda: open(os.path.join(model_path(), "config.json"), "r+b")),
        # The memfd may be reopened read-write, but its seals refuse every write.
        "write_backbone": attempt(lambda: os.pwrite(os.open(f"/proc/self/fd/{fd}", os.O_RDWR),
                                                    b"\0", 0)),
        "map_backbone_writable": attempt(lambda: mmap.mmap(
            os.open(f"/proc/self/fd/{fd}", os.O_RDWR), 0, flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE)),
        "read_node_environ": attempt(lambda: open(f"/proc/{event['node_pid']}/environ", "rb").read()),
        "signal_zygote": attempt(lambda: os.kill(event["zygote_pid"], 0)),
        "signal_other_sandbox": attempt(lambda: os.kill(event["other_pid"], 0)),
        "see_node_secret": "ALLOWED" if "FAAS_TEST_NODE_SECRET" in os.environ else "blocked",
        "connect_nats": attempt(lambda: socket.create_connection((host, int(port)), timeout=2)),
    }
