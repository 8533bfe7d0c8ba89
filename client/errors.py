"""One error hierarchy; one pure function maps gRPC status / Triton messages to it."""

from __future__ import annotations

from common.errors import BAD_REQUEST_MARKER, HermesError


class ClientError(HermesError):
    """Base of every error this client raises."""


class BadRequestError(ClientError):
    """The server refused the request (invalid parameter, empty or over-long prompt)."""


class UnavailableError(ClientError):
    """The server cannot be reached or is not ready (retried before the first chunk)."""


class OverloadedError(UnavailableError):
    """The server's queue is full: retry later (the client retries with backoff before the first token)."""


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
# A full queue: TensorRT-LLM's executor (executorImpl.cpp enqueueRequests, 1.2.x; the backend returns it as
# INTERNAL) and Triton core's dynamic batcher (scheduler_utils.cc, r24.10; UNAVAILABLE).
OVERLOADED_ERRORS = ("Maximum queue size of", "Exceeds maximum queue size")
# A server that is shutting down (server 2.51: core server.cc "Server exiting", dynamic_batch_scheduler.cc
# "Server is stopping", and models already unloaded): try another replica.
STOPPING_ERRORS = ("Server exiting", "Server is stopping", "has no available versions")
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
    if any(h in message for h in OVERLOADED_ERRORS):
        return OverloadedError(message)
    if any(h in message for h in STOPPING_ERRORS):
        return UnavailableError(message)
    if name in _BY_STATUS:
        return _BY_STATUS[name](message)
    if BAD_REQUEST_MARKER in message or any(h in message for h in TRITON_INPUT_ERRORS):
        return BadRequestError(message)
    return ServerError(message)
