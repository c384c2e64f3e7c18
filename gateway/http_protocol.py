"""uvicorn's httptools protocol with bounds on the request head.

httptools reads request headers of any size and uvicorn gives them no deadline, so a
client could hold memory (a megabyte of headers) or a connection (headers sent a byte a
minute) for free. This subclass refuses a request line and headers over
`limits.max_header_bytes` with 431, a head not complete `limits.header_timeout_seconds`
after the connection opened or the request's first byte with 408, and answers malformed
HTTP with the gateway's JSON error body instead of uvicorn's plain text.

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


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop httptools; `refusal` says what to answer."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: LimitsConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes = limits.max_header_bytes
        self.head_timeout = limits.header_timeout_seconds
        self.in_head = True  # from the connection or a request's first byte to its body
        self.head_began = False  # the current read holds the first byte of a request
        self.head_size = 0  # the head as parsed: request line and header lines
        self.head_bytes = 0  # bytes read while the head was incomplete
        self.refusal: GatewayError | None = None
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that sends nothing is closed on time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.head_began = False
        super().data_received(data)
        if not self.in_head or self.transport.is_closing():
            return
        # httptools holds a header line until it ends, so the parsed size alone does not
        # bound memory: reads since the one the head began in (which may also hold an
        # earlier pipelined request) count too. Memory: the limit plus one read.
        if not self.head_began:
            self.head_bytes += len(data)
        if self.head_bytes > self.max_head_bytes:
            self.refuse(self._too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head, self.head_began = True, True
        self.head_size = self.head_bytes = 0
        if self.head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._grow(len(name) + len(value) + 4)  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        self.refuse(self.refusal or BadRequest(f"malformed HTTP request: {msg}"))

    def refuse(self, error: GatewayError) -> None:
        """Answer `error` and close; while an earlier pipelined response is still being sent
        the answer would corrupt it, so the connection is only closed."""
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(error_response(error))
        self.transport.close()

    def _grow(self, size: int) -> None:
        self.head_size += size
        if self.head_size > self.max_head_bytes:
            self.refusal = self._too_large()
            raise _HeadTooLarge  # httptools stops; uvicorn calls send_400_response

    def _too_large(self) -> GatewayError:
        return HeadersTooLarge(f"the request head is over {self.max_head_bytes} bytes")

    def _arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if not self.in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head waits while the response before it runs
            return
        self.refuse(
            RequestTimeout(f"the request head did not arrive within {self.head_timeout:g} s")
        )
