"""uvicorn's httptools protocol with bounds on the request head.

httptools reads request headers of any size and uvicorn gives them no deadline, so a
client could hold memory (a megabyte of headers) or a connection (headers sent a byte a
minute) for free. This subclass refuses a head over `limits.max_header_bytes` with 431,
one that has not arrived within `limits.header_timeout_seconds` with 408, and answers
malformed HTTP with the gateway's JSON error body instead of uvicorn's plain text.

`gateway serve` gives uvicorn `protocol(limits)` as its `http` class; the rest of the
protocol (and its speed) is uvicorn's.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.config import LimitsConfig
from gateway.errors import BadRequest, GatewayError, RequestTimeout


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


def protocol(limits: LimitsConfig) -> Any:
    """What uvicorn's `http=` takes: a protocol factory bound to `limits` (picklable, so it
    reaches every worker process)."""
    return functools.partial(BoundedHttpToolsProtocol, limits=limits)


def error_response(error: GatewayError) -> bytes:
    """A complete HTTP/1.1 answer carrying `error`'s JSON body; the connection closes after."""
    body = orjson.dumps(error.body())
    return b"".join(
        [
            STATUS_LINE[error.status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: LimitsConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes = limits.max_header_bytes
        self.head_timeout = limits.header_timeout_seconds
        self.in_head = True  # between a request's first byte (or the connection) and its body
        self.head_began = False  # the current read holds the first byte of a request
        self.head_bytes = 0
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.head_began = False
        super().data_received(data)
        if not self.in_head or self.transport.is_closing():
            return
        # Every read since the one the head began in is head (the body comes after it).
        # The read it began in may also hold an earlier pipelined request, so it is not
        # counted: a head is bounded by the limit plus one read.
        if not self.head_began:
            self.head_bytes += len(data)
        if self.head_bytes > self.max_head_bytes:
            self.refuse(HeadersTooLarge(f"the request head is over {self.max_head_bytes} bytes"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self.head_began = True
        self.head_bytes = 0
        if self.head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's head starts now (uvicorn's keep-alive timer bounds the idle
        # wait for its first byte; this one bounds the whole head once it starts).
        self.in_head = True
        self.head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        self.refuse(BadRequest(f"malformed HTTP request: {msg}"))

    def refuse(self, error: GatewayError) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(error_response(error))
            self.transport.close()

    def _arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.in_head:
            self.refuse(
                RequestTimeout(f"the request head did not arrive within {self.head_timeout:g} s")
            )
