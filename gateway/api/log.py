"""One log line per request, and the x-request-id header on every response."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.http import request_id
from gateway.metrics import Recorder

log = logging.getLogger("gateway.requests")

_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestLog:
    def __init__(self, app: ASGIApp, recorder: Recorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Request(scope))
        fields: dict[str, Any] = {}
        scope.setdefault("state", {}).update(request_id=rid, log=fields)
        status = 0
        answered = 0.0  # when the last body byte went out: the latency the client saw
        header = (b"x-request-id", rid.encode())

        async def sending(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            elif not message.get("more_body", False):
                answered = time.perf_counter()
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = (answered or time.perf_counter()) - started
            self._line(scope["path"], rid, status, seconds, fields)
            self.recorder.request(scope["path"], status, seconds, fields)

    def _line(
        self, path: str, rid: str, status: int, seconds: float, fields: dict[str, Any]
    ) -> None:
        level = logging.DEBUG if path in _QUIET else logging.INFO
        if not log.isEnabledFor(level):
            return
        line = {
            "request_id": rid,
            "path": path,
            "key": fields.get("key", "-"),
            "model": fields.get("model", "-"),
            "provider": fields.get("provider", "-"),
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
            "input_tokens": fields.get("input_tokens", 0),
            "output_tokens": fields.get("output_tokens", 0),
            "cost": f"{fields['cost']:.9f}" if "cost" in fields else "-",
            "cache": fields.get("cache", "-"),
        }
        text = " ".join(f"{name}={value}" for name, value in line.items())
        log.log(level, "%s", text, extra={"request": line})
