"""The FastAPI app: OpenAI-compatible endpoints in front of an engine.

Parts:
- `EngineLike`, `error_body`, `error_response`, `potluck_error_body`, `check_model`: in
  `api/contract.py` (shared with the route modules; imported here for existing callers).
- `create_app(engine, *, api_key=None, routers=(), public_paths=("/health",))`: the app. Routes:
  `GET /health`, `GET /version`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /tokenize`,
  `POST /detokenize`, and (from `api/openai_routes.py`) `POST /v1/completions`,
  `POST /v1/chat/completions`. Extra routers (cluster views, metrics, dashboard) mount through
  `routers`; `app.state.public_paths` lists the paths open without the API key.
- Error handlers: every error in OpenAI's envelope (api/contract.py): validation errors -> 400,
  `PotluckError` -> its status (429 + Retry-After when overloaded), unknown routes -> 404,
  anything else -> 500.
- `ApiKeyMiddleware`: `Authorization: Bearer <key>` on every path not in `app.state.public_paths`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Collection, Sequence
from importlib import metadata
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from api.openai_schema import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from api.contract import (EngineLike, check_model, error_body, error_response, potluck_error_body,  # noqa: F401
                          potluck_error_response)
from api.openai_routes import build_openai_router
from scheduler.errors import InvalidRequestError, PotluckError

log = logging.getLogger(__name__)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        elif err.get("type") == "missing" and not loc:
            msg = "the request body is missing"
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
        param = param or (".".join(loc) if loc else None)
    return "; ".join(parts) or "invalid request", param


class ApiKeyMiddleware:
    """Pure ASGI (streaming and disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp, api_key: str, public_paths: set[str]) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if hmac.compare_digest(given.strip(), self._expected):
            await self.app(scope, receive, send)
            return
        message = "Missing API key: send 'Authorization: Bearer <key>'." if not given else "Incorrect API key provided."
        response = error_response(401, message, "authentication_error", None, "invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _version() -> str:
    try:
        return metadata.version("potluck")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def create_app(
    engine: EngineLike,
    *,
    api_key: str | None = None,
    routers: Sequence[APIRouter] = (),
    public_paths: Collection[str] = ("/health",),
    allowed_origins: Sequence[str] = (),
) -> FastAPI:
    """The OpenAI-compatible app for `engine`. `routers` mount after the built-in routes.
    `allowed_origins`: CORS for browsers on those origins ("*": any); none: no CORS headers."""
    from api.openai_tools import template_messages

    app = FastAPI(title="potluck", version=_version(), docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.public_paths = set(public_paths)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param, None)

    @app.exception_handler(PotluckError)
    async def _on_potluck(_: Request, exc: PotluckError) -> JSONResponse:
        return potluck_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return error_response(exc.status_code, str(exc.detail), error_type, None, code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _on_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal server error", "server_error", None, None)

    @app.get("/health")
    async def health() -> JSONResponse:
        if getattr(engine, "cluster", None) is None:  # an engine without workers (tests)
            return JSONResponse({"status": "ok"})
        from scheduler.snapshots import health_snapshot

        return JSONResponse(health_snapshot(engine))  # type: ignore[arg-type]  # 200: the server answers

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _version()}

    def card() -> ModelCard:
        return ModelCard(id=engine.model_id, root=engine.model_id, max_model_len=engine.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return ModelList(data=[card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(engine, model_id)
        return card().model_dump()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
        check_model(engine, body.model)
        tok = engine.tokenizer
        if isinstance(body, TokenizeChatRequest):
            text = tok.apply_chat_template(template_messages(body.messages), body.add_generation_prompt)
        else:
            text = body.prompt
        ids = tok.encode(text, add_special_tokens=body.add_special_tokens)
        strs = [tok.id_to_token(i) or "" for i in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                                token_strs=strs).model_dump(exclude_none=True)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(engine, body.model)
        bad = [i for i in body.tokens if not 0 <= i < engine.tokenizer.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids out of range [0, {engine.tokenizer.vocab_size}): {bad[:5]}")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens)).model_dump()

    app.include_router(build_openai_router(engine))
    for router in routers:
        app.include_router(router)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, public_paths=app.state.public_paths)
    if allowed_origins:  # outermost: a preflight is answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in allowed_origins)
    return app
