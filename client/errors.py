"""One error hierarchy; one pure function maps gRPC status / Triton messages to it."""

from __future__ import annotations


class ClientError(Exception):
    """Base of every error this client raises."""

    retryable = False


class BadRequestError(ClientError):
    """The server refused the request (invalid parameter, empty or over-long prompt)."""


class UnavailableError(ClientError):
    """The server cannot be reached or is not ready."""

    retryable = True


class DeadlineExceededError(ClientError):
    """The request's deadline expired."""


class CancelledError(ClientError):
    """The request was cancelled."""


class ServerError(ClientError):
    """The server failed while handling the request."""


_BY_STATUS = {
    "INVALID_ARGUMENT": BadRequestError, "NOT_FOUND": BadRequestError, "OUT_OF_RANGE": BadRequestError,
    "FAILED_PRECONDITION": BadRequestError, "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError, "CANCELLED": CancelledError,
}
_BAD_REQUEST_HINTS = ("is empty", "must be", "at most", "not supported", "is required", "unexpected inference input",
                      "expected", "invalid", "unknown")


def error_from_grpc(status: str | None, message: str) -> ClientError:
    """Map a gRPC status name (e.g. "StatusCode.UNAVAILABLE" or "UNAVAILABLE") and message to an error.
    Triton reports in-band model errors (stream callbacks) with no or a generic status: their text decides."""
    name = (status or "").rsplit(".", 1)[-1].upper()
    if name in _BY_STATUS:
        return _BY_STATUS[name](message)
    if any(h in message for h in _BAD_REQUEST_HINTS):
        return BadRequestError(message)
    return ServerError(message)
