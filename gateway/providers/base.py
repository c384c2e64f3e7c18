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

import httpx
import orjson
from httpx_sse import EventSource, SSEError

from gateway.config import ProviderConfig
from gateway.errors import ProviderFailure, UpstreamRejected

CLIENT_ERRORS = frozenset({400, 404, 413, 422})
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
    """Shared plumbing of providers that speak HTTP: a pooled client and error mapping."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.base_url = (config.base_url or "").rstrip("/")
        self.api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_seconds, connect=min(config.timeout_seconds, 10)),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        )

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.client.post(
                self.base_url + path, content=orjson.dumps(body), headers=self.headers()
            )
        except httpx.HTTPError as exc:
            raise ProviderFailure(self.name, _transport_reason(exc)) from exc
        self.check_status(response.status_code, response.content)
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise ProviderFailure(self.name, "unparseable answer") from exc
        if not isinstance(answer, dict):
            raise ProviderFailure(self.name, "unparseable answer")
        return answer

    @asynccontextmanager
    async def open_stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[EventSource]:
        request = self.client.build_request(
            "POST", self.base_url + path, content=orjson.dumps(body), headers=self.headers()
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise ProviderFailure(self.name, _transport_reason(exc)) from exc
        try:
            if response.status_code != 200:
                self.check_status(response.status_code, await self._read(response))
            yield EventSource(response)
        except (httpx.HTTPError, SSEError) as exc:
            raise ProviderFailure(self.name, _transport_reason(exc)) from exc
        finally:
            await response.aclose()

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
        await self.client.aclose()

    async def _read(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError:
            return b""


def decode_event(data: str, provider: str) -> dict[str, Any]:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProviderFailure(provider, "unparseable stream event") from exc
    if not isinstance(event, dict):
        raise ProviderFailure(provider, "unparseable stream event")
    return event


def count(chunk: Chunk, usage: StreamUsage) -> None:
    """Track a streamed chunk: reported usage, and output bytes as the fallback bound."""
    reported = chunk.get("usage")
    if isinstance(reported, dict):
        usage.input_tokens = int(reported.get("prompt_tokens", 0))
        usage.output_tokens = int(reported.get("completion_tokens", 0))
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        usage.output_bytes += len((delta.get("content") or "").encode())
        for call in delta.get("tool_calls") or ():
            arguments = (call.get("function") or {}).get("arguments") or ""
            usage.output_bytes += len(arguments.encode())


def _transport_reason(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__


def _error_message(content: bytes) -> str:
    """The message of an OpenAI- or Anthropic-shaped error body, bounded in length."""
    try:
        body = orjson.loads(content)
        message = body["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return content[:200].decode("utf-8", "replace").strip()
    return str(message)[:500]
