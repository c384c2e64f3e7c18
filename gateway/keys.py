"""Gateway API keys: minting, lookup, listing, revocation, and where their state lives.

A raw key is `sk-gw-` followed by 43 URL-safe characters (256 random bits). Only its
SHA-256 is stored. The key id is the first 16 hex digits of that hash, so a request's key
is found with no index lookup, and every Redis key of one API key shares the hash tag
`{<id>}`: one shard of a cluster holds all of it, and the admission script touches
only that shard.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.errors import Unauthorized
from gateway.money import to_nano, to_usd
from gateway.store import Store

PREFIX = "sk-gw-"
INDEX = "gw:keys"
_RAW_LENGTH = len(PREFIX) + 43


@dataclass(frozen=True, slots=True)
class Slots:
    """The Redis keys of one API key, all under its hash tag."""

    record: str
    window: str
    spend: str
    resv: str
    lease: str
    usage: str
    totals: str

    @classmethod
    def of(cls, key_id: str) -> Slots:
        tag = f"gw:{{{key_id}}}"
        return cls(
            f"{tag}:key", f"{tag}:window", f"{tag}:spend",
            f"{tag}:resv", f"{tag}:lease", f"{tag}:usage", f"{tag}:totals",
        )  # fmt: skip


class KeySpec(BaseModel):
    """The body of POST /keys; 0 or absent means unlimited."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200)
    allowed_models: list[str] = Field(default_factory=list, max_length=1000)
    rate_per_min: int = Field(0, ge=0, le=10_000_000)
    monthly_cap: float = Field(0, ge=0, le=1e9, allow_inf_nan=False)
    hard_cap: float = Field(0, ge=0, le=1e9, allow_inf_nan=False)

    @field_validator("monthly_cap", "hard_cap")
    @classmethod
    def _cap_is_zero_or_countable(cls, value: float) -> float:
        # Money is counted in nano-USD; a smaller positive cap would round to 0, "unlimited".
        if 0 < value < 1e-9:
            raise ValueError("must be 0 (unlimited) or at least 0.000000001")
        return value


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def identify(raw: str) -> tuple[str, str]:
    """(key id, key hash) of a raw key; a string that cannot be a key is refused here."""
    if len(raw) != _RAW_LENGTH or not raw.startswith(PREFIX):
        raise Unauthorized("invalid API key")
    digest = hash_key(raw)
    return digest[:16], digest


def mint() -> str:
    return PREFIX + secrets.token_urlsafe(32)


async def create(store: Store, spec: KeySpec) -> tuple[str, dict[str, Any]]:
    """Mint a key, store its hash and limits; returns (raw key, record)."""
    raw = mint()
    key_id, digest = identify(raw)
    fields: dict[str, str | int] = {
        "hash": digest,
        "name": spec.name,
        "models": "".join(f"\n{m}" for m in spec.allowed_models) + "\n" * bool(spec.allowed_models),
        "rate": spec.rate_per_min,
        "monthly": to_nano(spec.monthly_cap),
        "hard": to_nano(spec.hard_cap),
        "created": int(time.time()),
        "revoked": 0,
    }
    slots = Slots.of(key_id)

    async def write() -> None:
        await store.redis.hset(slots.record, mapping=fields)  # type: ignore[arg-type]
        await store.redis.sadd(INDEX, key_id)

    await store.call(write)
    return raw, _record(key_id, {k: str(v) for k, v in fields.items()}, {})


async def authenticate(store: Store, raw: str) -> tuple[str, dict[str, str]]:
    """Look a key up outside admission (for /v1/models and /usage); 401 if unusable."""
    key_id, digest = identify(raw)
    fields = await store.call(lambda: _hash(store, Slots.of(key_id).record))
    if fields.get("hash") != digest or fields.get("revoked") == "1":
        raise Unauthorized("invalid or revoked API key")
    return key_id, fields


async def _hash(store: Store, name: str) -> dict[str, str]:
    return await store.redis.hgetall(name)  # type: ignore[return-value]


async def key_ids(store: Store) -> list[str]:
    return await members(store, INDEX)


async def members(store: Store, name: str) -> list[str]:
    """The members of a Redis set, sorted."""

    async def read() -> set[str]:
        return await store.redis.smembers(name)  # type: ignore[return-value]

    return sorted(await store.call(read))


async def fetch(store: Store, key_id: str, month: str) -> dict[str, Any] | None:
    slots = Slots.of(key_id)

    async def read() -> tuple[dict[str, str], dict[str, str]]:
        async with store.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(slots.record)
            pipe.hgetall(slots.spend)
            record, spend = await pipe.execute()
        return record, spend

    fields, spend = await store.call(read)
    if not fields:
        return None
    return _record(key_id, fields, spend, month)


async def listing(
    store: Store, month: str, after: str = "", limit: int | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Key records in key id order, from the first id past `after`: all of them, or a page
    of `limit` and the id to continue after when more follow."""
    ids = [key_id for key_id in await key_ids(store) if key_id > after]
    following = None
    if limit is not None and len(ids) > limit:
        ids = ids[:limit]
        following = ids[-1]
    records = [await fetch(store, key_id, month) for key_id in ids]
    return [r for r in records if r is not None], following


async def revoke(store: Store, key_id: str) -> bool:
    record = Slots.of(key_id).record

    async def write() -> bool:
        if not await store.redis.exists(record):
            return False
        await store.redis.hset(record, "revoked", 1)
        return True

    return await store.call(write)


def allowed_models(fields: dict[str, str]) -> list[str]:
    return [m for m in fields.get("models", "").split("\n") if m]


def _record(
    key_id: str, fields: dict[str, str], spend: dict[str, str], month: str = ""
) -> dict[str, Any]:
    return {
        "id": key_id,
        "name": fields.get("name", ""),
        "allowed_models": allowed_models(fields),
        "rate_per_min": int(fields.get("rate", 0)),
        "monthly_cap": to_usd(int(fields.get("monthly", 0))),
        "hard_cap": to_usd(int(fields.get("hard", 0))),
        "spend": to_usd(int(spend.get("total", 0))),
        "spend_month": to_usd(int(spend.get(f"m:{month}", 0))),
        "reserved": to_usd(int(spend.get("reserved", 0))),
        "created_at": int(fields.get("created", 0)),
        "revoked": fields.get("revoked") == "1",
    }
