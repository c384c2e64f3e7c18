"""Server-sent events read from an aiohttp response body, as the HTML standard parses
them (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).

aiohttp reads the bytes; this module only splits them into events: `event:` names the
event, `data:` lines join with newlines, a blank line dispatches, `:` starts a comment,
`id:` and `retry:` are read and ignored (a completion stream is never resumed). Lines end
in LF or CRLF; the lone CR the standard also allows is sent by no provider and not read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import StreamReader
from aiohttp.http_exceptions import LineTooLong

# One line of an event stream; a provider's largest chunk (a tool call's arguments in one
# event) stays far below this, and a stream that never sends a newline cannot grow past it.
MAX_LINE_BYTES = 8 * 1024 * 1024


class SSEError(Exception):
    """The body is not an event stream the gateway can read."""


@dataclass(slots=True, frozen=True)
class Event:
    event: str
    data: str


Events = AsyncIterator[Event]


async def server_sent_events(body: StreamReader) -> Events:
    """Every event of `body`, in order, until it ends (a last event without its blank line
    is dropped, as the standard says)."""
    name, data, first = "", list[str](), True
    while True:
        try:
            raw = await body.readline(max_line_length=MAX_LINE_BYTES)
        except LineTooLong as exc:
            raise SSEError(f"an event-stream line is over {MAX_LINE_BYTES} bytes") from exc
        if not raw:
            return
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise SSEError("an event-stream line is not UTF-8") from exc
        if first:
            line, first = line.removeprefix("\ufeff"), False  # a byte order mark may lead
        if not line:
            if data:
                yield Event(name or "message", "\n".join(data))
            name, data = "", []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
