"""The response cache: msgpack entries under a SHA-256 of everything that shapes the output.

Transport fields (`stream`, `stream_options`, `user`) are left out of the hash, so a
streamed and a plain request share an entry; a streamed answer is stored assembled and
replayed as a stream. With scope `key` the entry's Redis key carries the API key id, so
no tenant can read another's responses.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson
from redis import exceptions as rexc

from gateway.config import CacheConfig
from gateway.errors import StoreUnavailable
from gateway.store import Store

log = logging.getLogger(__name__)

TRANSPORT_FIELDS = frozenset({"stream", "stream_options", "user"})


@dataclass(frozen=True, slots=True)
class Entry:
    body: dict[str, Any]  # the OpenAI chat.completion as first served
    provider: str
    input_tokens: int
    output_tokens: int


def directives(header: str | None) -> tuple[bool, bool]:
    """(lookup, write) from a Cache-Control request header."""
    if not header:
        return True, True
    tokens = {part.strip().lower() for part in header.split(",")}
    return "no-cache" not in tokens, "no-store" not in tokens


class Cache:
    def __init__(self, config: CacheConfig, store: Store) -> None:
        self.config = config
        self.store = store

    def key_for(self, body: dict[str, Any], key_id: str) -> str:
        """Per-key entries share the key's {hash tag}, so the admission and settlement
        scripts can read and write them in their own round trips."""
        shaping = {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS}
        digest = hashlib.sha256(orjson.dumps(shaping, option=orjson.OPT_SORT_KEYS)).hexdigest()
        if self.config.scope == "key":
            return f"gw:{{{key_id}}}:cache:{digest}"
        return f"gw:cache:global:{digest}"

    def inline(self, state: Store) -> bool:
        """Whether the scripts on `state` can read and write this cache themselves."""
        return self.store is state and self.config.scope == "key"

    @staticmethod
    def encode(entry: Entry) -> bytes:
        packed: bytes = msgpack.packb(
            [entry.body, entry.provider, entry.input_tokens, entry.output_tokens]
        )
        return packed

    @staticmethod
    def decode(raw: bytes, cache_key: str) -> Entry | None:
        try:
            body, provider, input_tokens, output_tokens = msgpack.unpackb(raw)
            return Entry(body, provider, input_tokens, output_tokens)
        except (ValueError, TypeError, msgpack.UnpackException):
            log.warning("unreadable cache entry %s ignored", cache_key)
            return None

    async def get(self, cache_key: str) -> Entry | None:
        """A miss when absent or unreadable; the cache never fails a request."""
        try:
            raw = await self.store.call(lambda: self.store.binary.get(cache_key))
        except StoreUnavailable:
            return None
        except rexc.RedisError as exc:  # escaping, it would drop the ticket admitted beside it
            log.warning("cache read failed: %s", exc)
            return None
        if not isinstance(raw, bytes):  # absent (the binary client never decodes)
            return None
        return self.decode(raw, cache_key)

    async def put(self, cache_key: str, entry: Entry) -> None:
        packed = self.encode(entry)
        try:
            await self.store.call(
                lambda: self.store.binary.set(cache_key, packed, ex=self.config.ttl_seconds)
            )
        except (StoreUnavailable, rexc.RedisError) as exc:
            log.warning("cache write failed: %s", exc)
