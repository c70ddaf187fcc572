"""faas: serverless LoRA functions on NATS.

The SDK (this package) is light: importing it pulls in no torch. Declare functions with
`@function`, call them with `Client`; the runtime (`faas up`) serves them.
"""

# Everything up to the check below parses on old Pythons (no f-strings, no annotations
# but strings): an interpreter that is too old gets one line saying so, not a SyntaxError
# from some submodule.
import sys

MIN_PYTHON = (3, 11)


def python_problem(version: "tuple[int, ...] | None" = None) -> "str | None":
    """The message saying this Python (or `version`, a `sys.version_info`-like tuple) is
    too old for faas; None when it is new enough."""
    major, minor = tuple(version or sys.version_info)[:2]
    if (major, minor) >= MIN_PYTHON:
        return None
    return "faas needs Python %d.%d or newer; this is %d.%d" % (MIN_PYTHON + (major, minor))


if python_problem() is not None:
    # SystemExit rather than ImportError: nothing in faas can run here, and the console
    # script and `import faas` alike print just the message (exit status 1).
    raise SystemExit(python_problem())

from faas.client import Client
from faas.errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    FaasError,
    FunctionNotFound,
    HandlerError,
    Overloaded,
    PayloadTooLarge,
    SpecError,
)
from faas.jobs import Job
from faas.protocol import Chunk, Invocation
from faas.sdk import Context, FunctionSpec, Generation, function
from faas.sync import SyncClient

__all__ = [
    "BadRequest", "Cancelled", "Chunk", "Client", "Context", "DeadlineExceeded", "FaasError", "FunctionNotFound",
    "FunctionSpec", "Generation", "HandlerError", "Invocation", "Job", "Overloaded", "PayloadTooLarge", "SpecError",
    "SyncClient", "function",
]
