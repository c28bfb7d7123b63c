"""Pure ASGI middleware (no BaseHTTPMiddleware, so streams and disconnects pass through untouched):
request ids, API key (``Authorization: Bearer KEY`` or Anthropic's ``x-api-key: KEY``), request body
size limit. Their errors take the shape of the route asked (Anthropic's for ``/v1/messages*``)."""
from __future__ import annotations

import hmac
import json
import uuid

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistralpy.server.errors import error_body_for, is_anthropic_path

# Paths reachable without the API key: health checks, metrics scrapers and the docs.
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


async def _send_error(scope: Scope, send: Send, status: int, message: str,
                      headers: list[tuple[bytes, bytes]] | None = None, code: str | None = None) -> None:
    body = json.dumps(error_body_for(scope.get("path", ""), status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestIdMiddleware:
    """Echo the client's ``x-request-id`` (or a fresh one) on every response; stored in scope["state"]."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = (_header(scope, b"x-request-id") or uuid.uuid4().hex)[:128]
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (what Anthropic's clients
    send) outside PUBLIC_PATHS (and CORS preflights)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.expected_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        bearer = (_header(scope, b"authorization") or "").encode("latin-1")
        x_api_key = (_header(scope, b"x-api-key") or "").encode("latin-1")
        # Both compared every time: which header is present is no secret, the key is.
        ok_bearer = hmac.compare_digest(bearer, self.expected)
        ok_key = hmac.compare_digest(x_api_key, self.expected_key)
        if not (ok_bearer or ok_key):
            hint = "x-api-key: KEY" if is_anthropic_path(scope["path"]) else "Authorization: Bearer KEY"
            return await _send_error(scope, send, 401, f"missing or invalid API key (send '{hint}')",
                                     [(b"www-authenticate", b"Bearer")], code="invalid_api_key")
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Answer 413 when the declared or received request body exceeds ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body larger than the limit of {self.max_bytes} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(scope, send, 413, too_large, code="request_too_large")
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(scope, send, 413, too_large, code="request_too_large")


class _TooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing re-raises it and the error handlers answer 413.
    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class RequestMetricsMiddleware:
    """Count answered requests by endpoint and status for /metrics (unknown paths count as "other",
    so scanners cannot grow the label set)."""

    def __init__(self, app: ASGIApp, metrics, endpoints: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = 500  # if the app dies before answering

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.request_done(endpoint, status)
