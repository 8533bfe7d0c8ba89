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
# The stable marker the deployment's own models put at the start of every request they refuse
# (model_repo/triton_models/common.py sends it); in-band stream errors carry no status code.
BAD_REQUEST_MARKER = "invalid request: "
# Triton core's own input checks (server 2.51, src/core infer_request.cc and the HTTP/gRPC frontends),
# which refuse a request before any model sees it.
TRITON_INPUT_ERRORS = ("unexpected inference input", "unexpected datatype", "unexpected shape for input",
                       "inputs but got", "is not found", "batch-size must be", "failed to parse",
                       "unable to parse", "expected a single")


def error_from_grpc(status: str | None, message: str) -> ClientError:
    """Map a gRPC status name (e.g. "StatusCode.UNAVAILABLE" or "UNAVAILABLE") and message to an error.
    Streams report in-band errors without a status: the deployment's marker or one of Triton core's
    input-check messages makes a bad request; anything else is a server error."""
    name = (status or "").rsplit(".", 1)[-1].upper()
    if name in _BY_STATUS:
        return _BY_STATUS[name](message)
    if BAD_REQUEST_MARKER in message or any(h in message for h in TRITON_INPUT_ERRORS):
        return BadRequestError(message)
    return ServerError(message)
