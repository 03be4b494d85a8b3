"""Errors a request can meet before or while it is served, each with its HTTP status."""

from __future__ import annotations


class PotluckError(Exception):
    """Base error: `status_code` and OpenAI `error.type` travel to the client."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(PotluckError):
    status_code = 400
    error_type = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(PotluckError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class AuthenticationError(PotluckError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class NoCapacityError(PotluckError):
    """No worker serves the model yet, or no path through the stages remains."""

    status_code = 503
    error_type = "service_unavailable"


class OverloadedError(PotluckError):
    """The admission queue is past its bound; the client should retry after `retry_after_s`."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationFailedError(PotluckError):
    """The request failed mid-generation and could not be recovered."""

    status_code = 500
    error_type = "server_error"
