"""Errors as OpenAI error JSON: ``{"error": {"message", "type", "param", "code"}}``.

Status codes: every invalid request (malformed JSON, schema violation, bad value, prompt too long)
is 400 with type ``invalid_request_error``; unknown model 404; missing/wrong API key 401; body too
large 413; engine failure 500 (with the partial output when there is one).
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistralpy.errors import EngineDeadError, InvalidRequestError, MistralPyError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          500: "internal_server_error", 503: "service_unavailable"}


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
                   extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(status, message, param, code)
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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {errors[0].get('msg')}", code="json_invalid")
        parts = []
        for e in errors[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error_response(400, "invalid request: " + "; ".join(parts), _validation_param(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(MistralPyError)
    async def _engine(request: Request, exc: MistralPyError) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status, err.message, err.param, err.code)
