"""One log line per request, and the x-request-id header on every response."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.http import request_id

log = logging.getLogger("gateway.requests")

_QUIET = frozenset({"/healthz", "/readyz"})


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Request(scope))
        fields: dict[str, Any] = {}
        scope.setdefault("state", {}).update(request_id=rid, log=fields)
        status = 0
        header = (b"x-request-id", rid.encode())

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, sending)
        finally:
            self._line(scope["path"], rid, status, time.perf_counter() - started, fields)

    def _line(
        self, path: str, rid: str, status: int, seconds: float, fields: dict[str, Any]
    ) -> None:
        level = logging.DEBUG if path in _QUIET else logging.INFO
        log.log(
            level,
            "request_id=%s path=%s key=%s model=%s provider=%s status=%s latency_ms=%.1f "
            "cost=%s cache=%s",
            rid, path, fields.get("key", "-"), fields.get("model", "-"),
            fields.get("provider", "-"), status, seconds * 1000,
            fields.get("cost", "-"), fields.get("cache", "-"),
        )  # fmt: skip
