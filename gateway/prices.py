"""The price book: per-model prices from the config, overridable at run time.

Overrides live in the Redis hash `gw:prices`; a PUT writes it and publishes on the
channel of the same name, and every worker of every replica listens and reloads, so a
new price applies everywhere within a round trip. Each worker keeps the book in memory:
reading it costs nothing on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from decimal import Decimal

import orjson
from redis import exceptions as rexc

from gateway.config import Config
from gateway.money import to_nano, to_usd
from gateway.store import Store

log = logging.getLogger(__name__)

BOOK = "gw:prices"
_RELISTEN_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Price:
    input_per_1k: int  # nano-USD per 1K input tokens
    output_per_1k: int  # nano-USD per 1K output tokens

    @classmethod
    def of(cls, input_usd: Decimal | float, output_usd: Decimal | float) -> Price:
        return cls(to_nano(input_usd, round_up=True), to_nano(output_usd, round_up=True))

    def as_json(self) -> dict[str, float]:
        return {
            "input_per_1k": to_usd(self.input_per_1k),
            "output_per_1k": to_usd(self.output_per_1k),
        }


class PriceBook:
    def __init__(self, config: Config, store: Store) -> None:
        self.store = store
        self.defaults = {
            name: Price.of(model.input_per_1k, model.output_per_1k)
            for name, model in config.models.items()
        }
        self.prices = dict(self.defaults)
        self._listener: asyncio.Task[None] | None = None

    def __getitem__(self, model: str) -> Price:
        return self.prices[model]

    def as_json(self) -> dict[str, dict[str, float]]:
        return {name: price.as_json() for name, price in sorted(self.prices.items())}

    async def put(self, model: str, price: Price) -> None:
        encoded = orjson.dumps([price.input_per_1k, price.output_per_1k])

        async def write() -> None:
            await self.store.redis.hset(BOOK, model, encoded)
            await self.store.redis.publish(BOOK, model)

        await self.store.call(write)
        self.prices[model] = price

    async def reload(self) -> None:
        overrides: dict[str, str] = await self.store.call(self._read_overrides)
        prices = dict(self.defaults)
        for model, encoded in overrides.items():
            if model in prices:
                input_nano, output_nano = orjson.loads(encoded)
                prices[model] = Price(int(input_nano), int(output_nano))
        self.prices = prices

    async def _read_overrides(self) -> dict[str, str]:
        return await self.store.redis.hgetall(BOOK)  # type: ignore[return-value]

    def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="price-book")

    async def stop(self) -> None:
        if self._listener:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def _listen(self) -> None:
        """Reload on every publish; after a lost connection, resubscribe and reload."""
        while True:
            try:
                async with self.store.redis.pubsub() as pubsub:
                    await pubsub.subscribe(BOOK)
                    await self.reload()
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            await self.reload()
            except (rexc.RedisError, OSError) as exc:
                log.warning("price book listener lost the store (%s); retrying", exc)
            except Exception as exc:  # a listener must never die silently
                log.warning("price book listener failed (%s); retrying", exc)
            await asyncio.sleep(_RELISTEN_SECONDS)
