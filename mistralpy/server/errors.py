"""Errors as OpenAI error JSON: ``{"error": {"message", "type", "param", "code"}}``.

Status codes: every invalid request (malformed JSON, schema violation, bad value, prompt too long)
is 400 with type ``invalid_request_error``; unknown model 404; missing/wrong API key 401; body too
large 413; engine failure 500 (with the partial output when there is one).

The Anthropic Messages routes (``/v1/messages*``) answer the same statuses in Anthropic's shape:
``{"type": "error", "error": {"type", "message"}}`` (:func:`error_body_for` picks by path).
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from mistralpy.errors import EngineDeadError, InvalidRequestError, MistralPyError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          500: "internal_server_error", 503: "service_unavailable"}


# Anthropic's error types by status (docs.anthropic.com "Errors"); 503 (a model unloaded) is ours.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_body_for(path: str, status: int, message: str, param: str | None = None,
                   code: str | None = None) -> dict[str, Any]:
    """The error body in the shape the route at ``path`` speaks (Anthropic's or OpenAI's)."""
    if is_anthropic_path(path):
        return anthropic_error_body(status, message)
    return error_body(status, message, param, code)


class APIError(Exception):
    """An error the server answers with ``status`` and OpenAI error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.extra = status, message, param, code, extra


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                   path: str = "") -> JSONResponse:
    body = error_body_for(path, status, message, param, code)
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception raised while serving a request to an APIError."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        code = "context_length_exceeded" if type(exc).__name__ == "PromptTooLongError" else None
        return APIError(400, str(exc), exc.field, code)
    if isinstance(exc, EngineDeadError):
        return APIError(500, f"the engine is not running: {exc}", code="engine_dead")
    if isinstance(exc, MistralPyError):
        return APIError(500, str(exc))
    log.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def _validation_param(errors: list[dict[str, Any]]) -> str | None:
    if not errors:
        return None
    loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
    return ".".join(loc) or None


def _path(request: Request) -> str:
    return request.scope.get("path", "")


def _allow(request: Request) -> str | None:
    """The Allow header of a 405: the methods of the most specific routes matching the path (the
    most literal segments), so ``/v1/models/{id:path}`` (GET) does not claim ``/v1/models/x/reload``."""
    best: tuple[int, set[str]] = (-1, set())
    for route in request.app.router.routes:
        methods = getattr(route, "methods", None)
        if not methods:
            continue
        match, _ = route.matches({**request.scope, "method": next(iter(methods))})
        if match != Match.FULL:
            continue
        literal = sum(1 for part in route.path_format.split("/") if part and "{" not in part)
        if literal > best[0]:
            best = (literal, set(methods))
        elif literal == best[0]:
            best[1].update(methods)
    return ", ".join(sorted(best[1])) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.extra, path=_path(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {errors[0].get('msg')}", code="json_invalid",
                                  path=_path(request))
        parts = []
        for e in errors[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error_response(400, "invalid request: " + "; ".join(parts), _validation_param(errors),
                              path=_path(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405 and (allow := _allow(request)):
            headers["Allow"] = allow  # Starlette's names only the first route that matched the path
        return error_response(exc.status_code, str(exc.detail), headers=headers or None, path=_path(request))

    @app.exception_handler(MistralPyError)
    async def _engine(request: Request, exc: MistralPyError) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status, err.message, err.param, err.code, path=_path(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status, err.message, err.param, err.code, path=_path(request))
