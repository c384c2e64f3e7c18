"""Upstreams whose answers are well-formed HTTP but wrong or hostile: absurd token counts,
chunks of the wrong shape, a stream cut cleanly before its end, redirects. Each one fails
its route (fallback before the first byte, an `error` event after it), and the books
balance: nothing a provider says can reach them unchecked."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway import config as config_module
from gateway.app import create_app
from tests.conftest import config_dict
from tests.servers import RedisServer, ThreadServer
from tests.test_faults import Figures, Traffic, audit, mint, publish, settle_down
from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

FIGURES = Figures()
HTTP = httpx.Client()


@pytest.fixture(scope="module", autouse=True)
def _publish_figures() -> Iterator[None]:
    yield
    HTTP.close()
    publish("test_hostile_upstreams", FIGURES)


def _chunk(delta: Any, finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + orjson.dumps({"id": "c", "choices": [choice], **extra}) + b"\n\n"


def _message(prompt_tokens: Any, choices: Any = None) -> bytes:
    default = [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 2}
    # json, not orjson: it writes integers past 64 bits, as a broken upstream may.
    return json.dumps({"id": "m", "choices": choices or default, "usage": usage}).encode()


JSON, SSE = "application/json", "text/event-stream"
GOOD = _chunk({"role": "assistant", "content": "first"})
STOP = _chunk({}, "stop") + b"data: [DONE]\n\n"
# name -> (content type, body); the body is sent as it is, then the connection closes.
CANNED: dict[str, tuple[str, bytes]] = {
    "huge-tokens": (JSON, _message(10**20)),
    "float-tokens": (JSON, _message(1.5e30)),
    "negative-tokens": (JSON, _message(-1000)),
    "choice-not-object": (JSON, _message(1, ["x"])),
    "null-choice-first": (SSE, b'data: {"choices": [null]}\n\n'),
    "string-delta-first": (SSE, _chunk("str")),
    "bad-index-later": (SSE, GOOD + _chunk({"content": "x"}, index="zero")),
    "number-content-later": (SSE, GOOD + _chunk({"content": 5})),
    "bad-usage-later": (SSE, GOOD + _chunk({}, "stop", usage={"prompt_tokens": "abc"})),
    "ends-without-done": (SSE, GOOD),
    "bom-then-whole": (SSE, b"\xef\xbb\xbf" + GOOD + STOP),
    "whole": (JSON, _message(3)),
}


class Canned:
    """A raw HTTP server: the path's last part names the canned answer, `redirect` sends a
    307 to `target` instead. Every request line and its headers are kept."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.model = ""  # which canned answer to send
        self.redirect_to = ""
        self.cookie = b""  # a set-cookie header line to add to each answer
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._answer, "127.0.0.1", 0)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            length = next(
                (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                 if line.startswith(b"content-length:")), 0)  # fmt: skip
            await reader.readexactly(length)
            if self.redirect_to:
                writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nlocation: %s\r\n"
                             b"content-length: 0\r\n\r\n" % self.redirect_to.encode())  # fmt: skip
            else:
                kind, body = CANNED[self.model]
                head = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                head += self.cookie.replace(b"%", b"%%")
                head += b"connection: close\r\n\r\n"  # or a pooled reuse may hit the close
                writer.write(head % (kind.encode(), len(body)) + body)
            await writer.drain()
        finally:
            writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def canned() -> Iterator[Canned]:
    server = Canned()
    yield server
    server.stop()


@pytest.fixture
def gateway(
    canned: Canned, redis_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> Iterator[str]:
    raw = config_dict(upstreams)
    raw["providers"]["canned"] = {
        "type": "openai", "base_url": f"http://127.0.0.1:{canned.port}/v1",
        "api_key_env": "OPENAI_STANDIN_KEY", "timeout_seconds": 3,
    }  # fmt: skip
    # By name: aiohttp would keep no cookie from an IP address anyway.
    raw["providers"]["canned-by-name"] = {
        **raw["providers"]["canned"],
        "base_url": f"http://localhost:{canned.port}/v1",
    }
    price = {k: raw["models"]["gpt"][k] for k in ("input_per_1k", "output_per_1k")}
    raw["models"]["canned-first"] = {
        **price,
        "routes": [{"provider": "canned", "model": "x"}, {"provider": "claude", "model": "c"}],
    }
    raw["models"]["canned-by-name"] = {
        **price,
        "routes": [{"provider": "canned-by-name", "model": "x"}],
    }
    server = ThreadServer(create_app(config_module.parse(raw, "hostile"), redis_url)).start()
    yield server.url
    server.stop()


# (canned answer, stream) -> "claude" (the next route served it) or "partial" (a stream
# that had begun ends with an error event) or "served" (by the canned upstream itself).
CASES = [
    ("huge-tokens", False, "claude"),
    ("float-tokens", False, "claude"),
    ("negative-tokens", False, "claude"),
    ("choice-not-object", False, "claude"),
    ("null-choice-first", True, "claude"),
    ("string-delta-first", True, "claude"),
    ("bad-index-later", True, "partial"),
    ("number-content-later", True, "partial"),
    ("bad-usage-later", True, "partial"),
    ("ends-without-done", True, "partial"),
    ("bom-then-whole", True, "served"),
]


@pytest.mark.parametrize(("name", "stream", "expected"), CASES)
def test_hostile_answer_fails_its_route_and_the_books_balance(
    gateway: str,
    canned: Canned,
    redis_server: RedisServer,
    admin_key: str,
    name: str,
    stream: bool,
    expected: str,
) -> None:
    canned.model = name
    traffic = Traffic(gateway, FIGURES, http=HTTP)
    key, _ = mint(gateway, admin_key, monthly_cap=1)
    FIGURES.faults_injected += 1
    answers = [
        traffic.complete(key, model="canned-first", stream=stream, content="hostile")
        for _ in range(2)  # the second one shows that nothing bad was cached either
    ]
    for answer in answers:
        assert answer.status == 200, answer.body
        if expected == "claude":
            assert answer.headers["x-gateway-provider"] == "claude"
            assert answer.outcome == "served"
        elif expected == "partial":
            assert answer.outcome == "partial", answer.body
            assert "error" in json.loads(answer.body[-1])
        else:
            assert answer.headers["x-gateway-provider"] == "canned"
            assert answer.outcome == "served"
    settle_down(redis_server.client(), timeout=3)
    assert audit(redis_server.client(), traffic.answers, FIGURES) == []


def test_a_cookie_one_answer_sets_never_reaches_the_upstream_again(
    gateway: str, canned: Canned, admin_key: str
) -> None:
    """One upstream session serves every consumer: what a provider tells one of them to
    send back must not ride along on the next one's request."""
    canned.model = "whole"
    canned.cookie = b"set-cookie: session=consumer-a; Path=/\r\n"
    traffic = Traffic(gateway, FIGURES, http=HTTP)
    for _ in range(2):
        key, _ = mint(gateway, admin_key)
        answer = traffic.complete(key, model="canned-by-name", content="cookie")
        assert answer.status == 200, answer.body
    assert len(canned.heads) == 2
    assert all(b"\r\ncookie:" not in head.lower() for head in canned.heads)


def test_redirects_are_not_followed(
    gateway: str, canned: Canned, redis_server: RedisServer, admin_key: str
) -> None:
    """A 307 elsewhere fails the route: neither the prompt nor the key goes to the target."""
    target = Canned()
    try:
        canned.redirect_to = f"http://127.0.0.1:{target.port}/steal"
        traffic = Traffic(gateway, FIGURES, http=HTTP)
        key, _ = mint(gateway, admin_key)
        FIGURES.faults_injected += 1
        answer = traffic.complete(key, model="canned-first", content="secret prompt")
        assert answer.status == 200 and answer.headers["x-gateway-provider"] == "claude"
        assert target.heads == []
        settle_down(redis_server.client(), timeout=3)
        assert audit(redis_server.client(), traffic.answers, FIGURES) == []
    finally:
        target.stop()
