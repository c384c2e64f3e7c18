"""Server-sent events: relaying chunks, assembling them for the cache, replaying a hit.

`EventStream` is an ASGI response that watches for the client's disconnect while it
waits on the upstream, so a client that leaves cancels the upstream call at once
instead of at the next chunk (or its fallback to the next route), and it always calls
`on_close` (settlement) exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class Assembler:
    """Builds the chat.completion a stream amounts to, for the cache."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk.get(k) for k in ("id", "created", "model")}
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            self._merge(choice)

    def _merge(self, choice: dict[str, Any]) -> None:
        slot = self.choices.setdefault(
            choice.get("index", 0), {"content": None, "tool_calls": {}, "finish_reason": None}
        )
        delta = choice.get("delta") or {}
        if delta.get("content"):
            slot["content"] = (slot["content"] or "") + delta["content"]
        for call in delta.get("tool_calls") or ():
            merged = slot["tool_calls"].setdefault(
                call.get("index", 0),
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            merged["id"] = call.get("id") or merged["id"]
            function = call.get("function") or {}
            merged["function"]["name"] += function.get("name") or ""
            merged["function"]["arguments"] += function.get("arguments") or ""
        if choice.get("finish_reason"):
            slot["finish_reason"] = choice["finish_reason"]

    def completion(self) -> dict[str, Any]:
        choices = []
        for index, slot in sorted(self.choices.items()):
            message: dict[str, Any] = {"role": "assistant", "content": slot["content"]}
            if slot["tool_calls"]:
                message["tool_calls"] = [c for _, c in sorted(slot["tool_calls"].items())]
            choices.append(
                {"index": index, "message": message, "finish_reason": slot["finish_reason"]}
            )
        return {**self.head, "object": "chat.completion", "choices": choices, "usage": self.usage}


def replay(completion: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The chunks of a stream that would assemble to `completion`."""
    head = {k: completion.get(k) for k in ("id", "created", "model")}
    head["object"] = "chat.completion.chunk"
    chunks = []
    for choice in completion["choices"]:
        index, message = choice["index"], choice["message"]
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        chunks.append(
            {**head, "choices": [{"index": index, "delta": delta, "finish_reason": None}]}
        )
        finish = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        chunks.append({**head, "choices": [finish]})
    if include_usage:
        chunks.append({**head, "choices": [], "usage": completion.get("usage")})
    return chunks


Opener = Callable[[], Awaitable[tuple[dict[str, str], AsyncIterator[bytes]]]]


class EventStream:
    """Open a stream with `start`, then send its events as text/event-stream.

    The client's disconnect is watched from the first moment, while `start` still waits on
    a provider too, and cancels whatever is running. If `start` raises a `GatewayError`
    (every route failed, say), nothing was sent yet and the client gets that error as JSON.
    `on_close` runs exactly once, after the events are closed.
    """

    def __init__(self, start: Opener, on_close: Callable[[], Awaitable[None]]) -> None:
        self.start = start
        self.on_close = on_close
        self.events: AsyncIterator[bytes] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.create_task(self._pump(send))
        watch = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._close())

    async def _pump(self, send: Send) -> None:
        try:
            headers, self.events = await self.start()
        except GatewayError as exc:
            await _send_error(send, exc)
            return
        except Exception:
            log.exception("opening a stream failed")
            await _send_error(send, GatewayError("internal error"))
            return
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        raw += [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _close(self) -> None:
        try:
            if self.events is not None:
                await self.events.aclose()  # type: ignore[attr-defined]
        finally:
            await self.on_close()


async def _send_error(send: Send, exc: GatewayError) -> None:
    headers = [(k.encode(), v.encode()) for k, v in exc.headers().items()]
    headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": orjson.dumps(exc.body())})


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
