"""What every route module of the API shares: the engine it serves and OpenAI's error envelope.

Parts:
- `EngineLike`: the Protocol the app needs from the scheduler (`scheduler.engine.Engine` fits it).
- `error_body` / `error_response`: an error in OpenAI's envelope
  `{"error": {"message", "type", "param", "code"}}`; `potluck_error_body` / `potluck_error_response`:
  a `PotluckError` with its status (429 + Retry-After when overloaded).
- `check_model(engine, model)`: 404 model_not_found unless `model` is the served one.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from fastapi.responses import JSONResponse

from scheduler.errors import ModelNotFoundError, OverloadedError, PotluckError
from scheduler.request import GenerationOutput, GenerationRequest
from scheduler.tokenizer import Tokenizer


@runtime_checkable
class EngineLike(Protocol):
    """What the HTTP layer needs from the scheduler."""

    model_id: str  # served model name
    tokenizer: Tokenizer
    max_model_len: int  # context length in tokens (prompt + generated)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream the request's outputs; raises PotluckError subclasses (before or mid-stream).
        Closing the iterator (aclose) aborts the request."""
        ...


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status: int, message: str, error_type: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status, headers=headers)


def potluck_error_body(exc: PotluckError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, getattr(exc, "param", None), exc.code)


def potluck_error_response(exc: PotluckError) -> JSONResponse:
    headers = None
    if isinstance(exc, OverloadedError):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return JSONResponse(potluck_error_body(exc), status_code=exc.status_code, headers=headers)


def check_model(engine: EngineLike, model: str | None) -> None:
    """Raise 404 model_not_found unless `model` is the served model (None means the served one)."""
    if model is not None and model != engine.model_id:
        exc = ModelNotFoundError(f"The model `{model}` does not exist. This server serves `{engine.model_id}`.")
        exc.param = "model"  # type: ignore[attr-defined]
        raise exc
