"""faas: serverless LoRA functions on NATS.

The SDK (this package) is light: importing it pulls in no torch. Declare functions with
`@function`, call them with `Client`; the runtime (`faas up`) serves them.
"""

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
from faas.protocol import Chunk, Invocation
from faas.sdk import Context, FunctionSpec, Generation, function

__all__ = [
    "BadRequest", "Cancelled", "Chunk", "Client", "Context", "DeadlineExceeded", "FaasError", "FunctionNotFound",
    "FunctionSpec", "Generation", "HandlerError", "Invocation", "Overloaded", "PayloadTooLarge", "SpecError",
    "function",
]
