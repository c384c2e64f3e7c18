"""Routes and fallback: a model's routes are tried in order until one answers.

Fallback happens on `ProviderFailure` (connection errors, timeouts, 5xx, 429, 401/403,
unparseable answers). `UpstreamRejected` (the client's error) goes straight back to the
client. A stream falls back only until its first chunk is in hand, since after that
bytes have reached the client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gateway import metrics
from gateway.config import Config
from gateway.errors import AllRoutesFailed, ProviderFailure
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Chunk, Completion, Provider, StreamUsage
from gateway.providers.mock import MockProvider
from gateway.providers.openai import OpenAIProvider

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Served:
    provider: str
    completion: Completion


@dataclass(slots=True)
class Stream:
    provider: str
    chunks: AsyncIterator[Chunk]
    usage: StreamUsage
    failures: list[str] = field(default_factory=list)
    opened: float = 0.0  # perf_counter() when the gateway began asking for it


def build_provider(name: str, config: Config) -> Provider:
    settings = config.providers[name]
    if settings.type == "openai":
        return OpenAIProvider(name, settings)
    if settings.type == "anthropic":
        return AnthropicProvider(name, settings)
    return MockProvider(name)


class Router:
    def __init__(self, config: Config) -> None:
        self.providers = {name: build_provider(name, config) for name in config.providers}
        self.routes = {
            model: [(self.providers[r.provider], r.model) for r in settings.routes]
            for model, settings in config.models.items()
        }

    async def complete(self, model: str, body: dict[str, Any]) -> Served:
        failures: list[str] = []
        for provider, upstream_model in self.routes[model]:
            try:
                return Served(provider.name, await provider.complete(body, upstream_model))
            except ProviderFailure as exc:
                log.warning("route %s failed for %s: %s", provider.name, model, exc.reason)
                metrics.provider_failure(model, provider.name, exc.reason)
                failures.append(str(exc))
        raise AllRoutesFailed("every route failed: " + "; ".join(failures))

    async def stream(self, model: str, body: dict[str, Any]) -> Stream:
        failures: list[str] = []
        for provider, upstream_model in self.routes[model]:
            usage = StreamUsage()
            chunks = provider.stream(body, upstream_model, usage)
            try:
                first = await anext(chunks)
            except (ProviderFailure, StopAsyncIteration) as exc:
                await chunks.aclose()  # type: ignore[attr-defined]
                reason = exc.reason if isinstance(exc, ProviderFailure) else "empty stream"
                log.warning("route %s failed for %s: %s", provider.name, model, reason)
                metrics.provider_failure(model, provider.name, reason)
                failures.append(f"{provider.name}: {reason}")
                continue
            except BaseException:
                await chunks.aclose()  # type: ignore[attr-defined]
                raise
            return Stream(provider.name, _prepend(first, chunks), usage, failures)
        raise AllRoutesFailed("every route failed: " + "; ".join(failures))

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()


async def _prepend(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
