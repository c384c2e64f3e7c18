"""The event-stream reader, over a real HTTP connection: a raw server writes the bytes in
the pieces given (split anywhere, even inside a line), aiohttp reads them."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from gateway.providers import sse
from gateway.providers.sse import Event, SSEError, server_sent_events


async def _serve(pieces: list[bytes]) -> tuple[asyncio.Server, str]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/"


async def _events(pieces: list[bytes]) -> list[Event]:
    server, url = await _serve(pieces)
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            return [event async for event in server_sent_events(response.content)]
    finally:
        server.close()


def _split_everywhere(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


OPENAI = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
ANTHROPIC = (
    b'event: message_start\r\ndata: {"x": 1}\r\n\r\n'
    b": keep-alive comment\r\n\r\n"
    b'event: content_block_delta\r\ndata:{"y": 2}\r\n\r\n'
)


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
async def test_events_whatever_the_pieces(size: int) -> None:
    assert await _events(_split_everywhere(OPENAI, size)) == [
        Event("message", '{"a": 1}'),
        Event("message", '{"b": 2}'),
        Event("message", "[DONE]"),
    ]
    assert await _events(_split_everywhere(ANTHROPIC, size)) == [
        Event("message_start", '{"x": 1}'),
        Event("content_block_delta", '{"y": 2}'),
    ]


async def test_data_lines_join_and_other_fields_are_ignored() -> None:
    stream = b"id: 7\nretry: 100\nevent: e\ndata: one\ndata:  two\ndata\nunknown: x\n\n"
    assert await _events([stream]) == [Event("e", "one\n two\n")]


async def test_a_last_event_without_its_blank_line_is_dropped() -> None:
    assert await _events([b"data: whole\n\ndata: cut"]) == [Event("message", "whole")]


async def test_an_event_with_no_data_is_not_dispatched() -> None:
    assert await _events([b"event: ping\n\ndata: x\n\n"]) == [Event("message", "x")]


async def test_a_line_over_the_limit_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "MAX_LINE_BYTES", 1024)
    with pytest.raises(SSEError, match="over 1024 bytes"):
        await _events([b"data: " + b"a" * 4096 + b"\n\n"])


async def test_invalid_utf8_is_an_error() -> None:
    with pytest.raises(SSEError, match="not UTF-8"):
        await _events([b"data: \xff\xfe\n\n"])
