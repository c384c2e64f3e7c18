"""The wiring: one `Gateway` per worker process, built once from the config."""

from __future__ import annotations

import os
from dataclasses import dataclass

from gateway.admission import Gate
from gateway.auth import AdminAuth
from gateway.cache import Cache
from gateway.completions import Completions
from gateway.config import Config
from gateway.prices import PriceBook
from gateway.prompts import Prompts
from gateway.routing import Router
from gateway.store import Store


@dataclass
class Gateway:
    config: Config
    store: Store
    cache_store: Store
    prices: PriceBook
    router: Router
    gate: Gate
    completions: Completions
    admin: AdminAuth
    prompts: Prompts

    @classmethod
    def build(cls, config: Config, redis_url: str, cache_url: str | None = None) -> Gateway:
        store = Store(
            redis_url,
            wait_replicas=config.store.wait_replicas,
            wait_timeout_ms=config.store.wait_timeout_ms,
        )
        cache_store = Store(cache_url) if cache_url else store
        prices = PriceBook(config, store)
        router = Router(config)
        limits = config.limits
        lease_ms = int((limits.request_timeout_seconds + limits.lease_margin_seconds) * 1000)
        retention_ms = config.limits.usage_retention_days * 86_400_000
        gate = Gate(
            store,
            lease_ms=lease_ms,
            retention_ms=retention_ms,
            key_labels=config.metrics.per_key_labels,
        )
        cache = Cache(config.cache, cache_store)
        prompts = Prompts(store, config.limits)
        completions = Completions(config, gate, cache, prices, router, prompts)
        admin = AdminAuth(store, os.environ.get("GATEWAY_ADMIN_KEY") or None)
        return cls(config, store, cache_store, prices, router, gate, completions, admin, prompts)

    async def aclose(self) -> None:
        await self.gate.drain()
        await self.prices.stop()
        await self.router.aclose()
        if self.cache_store is not self.store:
            await self.cache_store.close()
        await self.store.close()
