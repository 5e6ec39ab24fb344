"""Errors the server turns into JSON 4xx answers: each carries its HTTP status and a short code."""

from __future__ import annotations


def lorakit_error(code: str, detail: str) -> dict:
    """The body of an error answer of lorakit's own API: `{"error": CODE, "detail": MESSAGE}`."""
    return {"error": code, "detail": detail}


class ServeError(ValueError):
    """A request (or a startup option) the user can fix; `status` is the HTTP status to answer."""

    status = 400
    code = "bad_request"


class UnknownAdapterError(ServeError):
    status = 404
    code = "unknown_adapter"


class AdapterExistsError(ServeError):
    status = 409
    code = "adapter_exists"


class AdapterLoadError(ServeError):
    """The adapter folder is missing, corrupted, or does not fit the base model."""

    status = 422
    code = "adapter_does_not_fit"


class InvalidInputError(ServeError):
    status = 422
    code = "invalid_input"


class TooManyTextsError(InvalidInputError):
    code = "too_many_texts"


class TextTooLongError(InvalidInputError):
    code = "text_too_long"


class UnauthorizedError(ServeError):
    status = 401
    code = "unauthorized"


class BodyTooLargeError(ServeError):
    status = 413
    code = "body_too_large"


class NotAnAdapterError(AdapterLoadError):
    """A run-time load whose path is no adapter under the adapter roots (one message for all)."""

    code = "not_an_adapter"


class AdapterOverLimitError(AdapterLoadError):
    """An adapter with more rank, bytes or labels than the server takes."""

    code = "adapter_over_limit"


class AdminClosedError(ServeError):
    """Loading and unloading on a server started with neither a key nor
    --allow-unauthenticated-admin."""

    status = 403
    code = "admin_closed"


class ServerBusyError(ServeError):
    """More requests wait than the server queues: the client should retry later."""

    status = 503
    code = "server_busy"
