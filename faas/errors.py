"""One error tree for the project: every error a node answers with, every failure of an
invocation the client raises, and every function declaration the SDK refuses derives from
FaasError (the engine's own protocol errors never leave it). A call that misuses the API
itself (a negative timeout, a prompt that is not text) raises TypeError or ValueError, as
Python's own functions do.

Each subclass carries the wire code that travels in the NATS micro error headers
(`Nats-Service-Error-Code`), so a caller catches exactly the failure it means.
"""

from __future__ import annotations


class FaasError(Exception):
    """Root of every error raised by faas. `code` is the wire code (HTTP-like)."""

    code: int = 500

    retry_after_s: float | None = None  # when retrying has a chance (503s)

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class SpecError(FaasError, ValueError):
    """A function declaration is invalid (raised when its module is imported)."""

    code = 400


class BadRequest(FaasError):
    """The request body or headers could not be understood."""

    code = 400


class PayloadTooLarge(BadRequest):
    """The request is larger than what it may carry (the NATS server's max payload, headers
    counted; the gateway's body limit)."""

    code = 413


class FunctionNotFound(FaasError):
    """No node serves a function of that name."""

    code = 404


class HandlerError(FaasError):
    """The handler raised, or its sandbox crashed while serving the request."""

    code = 500


class Overloaded(FaasError):
    """The function's queue is full, the node has no memory for another sandbox, or no node
    answers; retry later (after `retry_after_s`, when the node said)."""

    code = 503

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Cancelled(FaasError):
    """The caller cancelled the request (`faas.cancel.<request_id>`) before it completed."""

    code = 499


class DeadlineExceeded(FaasError):
    """The request's budget ran out before a reply."""

    code = 504


_BY_CODE: dict[int, type[FaasError]] = {
    cls.code: cls for cls in (BadRequest, PayloadTooLarge, FunctionNotFound, HandlerError, Overloaded,
                               DeadlineExceeded, Cancelled)
}


def error_for_code(code: int, message: str) -> FaasError:
    """The exception that a reply with this wire code stands for (unknown codes: FaasError)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = FaasError(message)
        err.code = code
        return err
    return cls(message)
