"""What every provider offers, and the one place HTTP client errors are mapped.

A provider takes an OpenAI-shaped chat body and answers in the OpenAI shape, whatever
its own wire format. Failures that allow fallback raise `ProviderFailure`; a provider's
400/404/413/422 is the client's error and raises `UpstreamRejected`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from gateway.config import ProviderConfig
from gateway.errors import ProviderFailure, UpstreamRejected
from gateway.providers.sse import Events, SSEError, server_sent_events

CLIENT_ERRORS = frozenset({400, 404, 413, 422})
# What a failed exchange raises: aiohttp's errors (its timeouts are also TimeoutError),
# a malformed HTTP answer, an event stream that breaks the format.
_TRANSPORT = (aiohttp.ClientError, HttpProcessingError, TimeoutError, SSEError)
Chunk = dict[str, Any]


@dataclass(slots=True)
class Completion:
    body: dict[str, Any]  # an OpenAI chat.completion
    input_tokens: int
    output_tokens: int


@dataclass(slots=True)
class StreamUsage:
    """What a stream has used so far; tokens stay None until the provider reports them."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    output_bytes: int = 0


class Provider(Protocol):
    name: str

    async def complete(self, body: dict[str, Any], model: str) -> Completion: ...

    def stream(
        self, body: dict[str, Any], model: str, usage: StreamUsage
    ) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


class HTTPProvider:
    """Shared plumbing of providers that speak HTTP: a pooled client and error mapping.

    The client is aiohttp's: on the hot path it costs a fraction of the CPU of the
    alternatives measured (bench/clients.py), and its pool does not slow down with the
    number of requests in flight.
    """

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.base_url = (config.base_url or "").rstrip("/")
        self.api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        seconds = config.timeout_seconds
        # No total: the request's own deadline (completions) bounds the whole exchange.
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(seconds, 10), sock_read=seconds
        )
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self.request_headers = self.headers()  # the same on every call: built once

    @property
    def session(self) -> aiohttp.ClientSession:
        """Made on first use: an aiohttp session belongs to the running event loop."""
        if self._session is None:
            # Idle connections are dropped after 5 s, sooner than most servers drop them:
            # a request sent on a connection the server is closing fails its route.
            connector = aiohttp.TCPConnector(limit=1000, keepalive_timeout=5)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                # One session serves every consumer: a cookie one answer sets must never
                # ride along on another consumer's request (and none are kept or parsed).
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def url(self, path: str) -> URL:
        """The upstream URL of `path`, parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self.session.post(
                self.url(path),
                data=orjson.dumps(body),
                headers=self.request_headers,
                allow_redirects=False,  # a redirect must not carry the key elsewhere
            ) as response:
                status, content = response.status, await response.read()
        except _TRANSPORT as exc:
            raise ProviderFailure(self.name, _transport_reason(exc)) from exc
        self.check_status(status, content)
        try:
            answer = orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            raise ProviderFailure(self.name, "unparseable answer") from exc
        if not isinstance(answer, dict):
            raise ProviderFailure(self.name, "unparseable answer")
        return answer

    @asynccontextmanager
    async def open_stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Events]:
        try:
            response = await self.session.post(
                self.url(path),
                data=orjson.dumps(body),
                headers=self.request_headers,
                allow_redirects=False,  # a redirect must not carry the key elsewhere
            )
        except _TRANSPORT as exc:
            raise ProviderFailure(self.name, _transport_reason(exc)) from exc
        try:
            if response.status != 200:
                self.check_status(response.status, await self._read(response))
            if response.content_type != "text/event-stream":
                raise SSEError(f"a stream answered with {response.content_type or 'no type'}")
            yield server_sent_events(response.content)
        except _TRANSPORT as exc:
            raise ProviderFailure(self.name, _transport_reason(exc)) from exc
        finally:
            # A stream left before its end closes its connection: the upstream stops.
            response.close()

    def check_status(self, status: int, content: bytes) -> None:
        if status < 300:
            return
        message = _error_message(content) or f"HTTP {status}"
        if status in CLIENT_ERRORS:
            raise UpstreamRejected(self.name, status, message)
        raise ProviderFailure(self.name, f"HTTP {status}: {message}")

    def headers(self) -> dict[str, str]:
        return {"content-type": "application/json"}

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        try:
            return await response.read()
        except _TRANSPORT:
            return b""


def decode_event(data: str, provider: str) -> dict[str, Any]:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProviderFailure(provider, "unparseable stream event") from exc
    if not isinstance(event, dict):
        raise ProviderFailure(provider, "unparseable stream event")
    return event


MAX_TOKENS = 10**9  # far above any real request; more is a broken or hostile answer


def tokens(value: object, provider: str) -> int:
    """A token count from a provider's answer; anything but a sane count fails the route
    (it would otherwise reach the books)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_TOKENS
        or value != int(value)
    ):
        raise ProviderFailure(provider, f"unparseable answer: {value!r} is not a token count")
    return int(value)


def count(chunk: Chunk, usage: StreamUsage, provider: str) -> None:
    """Check a streamed chunk's shape and track it: reported usage, and output bytes as the
    fallback bound. A chunk of the wrong shape fails the route."""
    if not _well_formed(chunk):
        raise ProviderFailure(provider, "unparseable stream chunk")
    reported = chunk.get("usage")
    if reported is not None:
        usage.input_tokens = tokens(reported.get("prompt_tokens", 0), provider)
        usage.output_tokens = tokens(reported.get("completion_tokens", 0), provider)
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        usage.output_bytes += len((delta.get("content") or "").encode())
        for call in delta.get("tool_calls") or ():
            arguments = (call.get("function") or {}).get("arguments") or ""
            usage.output_bytes += len(arguments.encode())


def _well_formed(chunk: Chunk) -> bool:
    """The parts of a chunk the gateway reads have the types the OpenAI format gives them."""
    if not _typed(chunk, usage=dict | None, choices=list | None):
        return False
    return all(_well_formed_choice(choice) for choice in chunk.get("choices") or ())


def _well_formed_choice(choice: object) -> bool:
    if not isinstance(choice, dict) or not _is_index(choice.get("index", 0)):
        return False
    if not _typed(choice, delta=dict | None, finish_reason=str | None):
        return False
    delta = choice.get("delta") or {}
    if not _typed(delta, content=str | None, tool_calls=list | None):
        return False
    return all(_well_formed_call(call) for call in delta.get("tool_calls") or ())


def _well_formed_call(call: object) -> bool:
    if not isinstance(call, dict) or not _is_index(call.get("index", 0)):
        return False
    if not _typed(call, id=str | None, function=dict | None):
        return False
    return _typed(call.get("function") or {}, name=str | None, arguments=str | None)


def _typed(fields: dict[str, Any], **types: Any) -> bool:
    """Each named field, present or not, has its type (None when absent)."""
    return all(isinstance(fields.get(name), kind) for name, kind in types.items())


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1024


def _transport_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection refused"
    if isinstance(exc, aiohttp.ClientConnectionError):  # reset, or closed mid-answer
        return f"connection lost: {exc.__class__.__name__}"
    if isinstance(exc, SSEError):
        return f"unreadable event stream: {exc}"
    # aiohttp's messages name the upstream's URL, which clients must not see.
    return exc.__class__.__name__


def _error_message(content: bytes) -> str:
    """The message of an OpenAI- or Anthropic-shaped error body, bounded in length."""
    try:
        body = orjson.loads(content)
        message = body["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return content[:200].decode("utf-8", "replace").strip()
    return str(message)[:500]
