"""Usage records: one per served completion, in a Redis stream per API key.

Stream ids are Redis time in ms, so `since`/`until` are id ranges and records come back
newest first with XREVRANGE. Across keys, pages are merged in (stream id, key id)
order and the cursor is the first record not yet returned. Such a page reads up to
limit + 1 records from every key's stream, so its cost grows with the number of keys;
`gateway usage export` walks one key at a time instead.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway import keys
from gateway.errors import BadRequest, Forbidden
from gateway.keys import Slots
from gateway.money import to_usd
from gateway.store import Store

MAX_LIMIT = 1000
_LAST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_MAX_SEQ = 2**63


@dataclass(frozen=True, slots=True)
class Query:
    keys: list[str] | None  # None: every key
    since_ms: int | None
    until_ms: int | None
    limit: int
    cursor: tuple[str, str] | None  # (stream id, key id)


def parse_query(params: dict[str, str], own_key: str | None) -> Query:
    """Query parameters of GET /usage; a key caller is confined to its own records."""
    key = params.get("key") or None
    if own_key is not None:
        if key not in (None, own_key):
            raise Forbidden("key: a key can read only its own usage")
        key = own_key
    try:
        limit = int(params.get("limit") or 100)
    except ValueError as exc:
        raise BadRequest("limit: must be an integer") from exc
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit: must be between 1 and {MAX_LIMIT}")
    return Query(
        keys=[key] if key else None,
        since_ms=_instant(params, "since"),
        until_ms=_instant(params, "until"),
        limit=limit,
        cursor=_cursor(params.get("cursor")),
    )


def _instant(params: dict[str, str], name: str) -> int | None:
    """Unix seconds or an ISO 8601 time (UTC unless it says otherwise), as ms."""
    value = params.get(name)
    if not value:
        return None
    try:
        ms = _ms(value)
    except (ValueError, OverflowError) as exc:
        raise BadRequest(f"{name}: expected Unix seconds or an ISO 8601 time") from exc
    if not 0 <= ms <= _LAST_MS:
        raise BadRequest(f"{name}: must be between 1970 and 9999")
    return ms


def _ms(value: str) -> int:
    try:
        return int(float(value) * 1000)
    except ValueError:
        pass
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _cursor(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    stream_id, _, key_id = value.partition(":")
    ms, _, seq = stream_id.partition("-")
    valid = ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()
    if not (valid and key_id.isascii() and key_id.isalnum()):
        raise BadRequest("cursor: not a cursor returned by this endpoint")
    if int(ms) > _LAST_MS or int(seq) >= _MAX_SEQ:
        raise BadRequest("cursor: not a cursor returned by this endpoint")
    return stream_id, key_id


async def records(store: Store, query: Query) -> tuple[list[dict[str, Any]], str | None]:
    """One page of records, newest first, and the cursor of the next page."""
    key_ids = query.keys or await keys.key_ids(store)
    upper = query.cursor[0] if query.cursor else _bound(query.until_ms, "+")
    lower = _bound(query.since_ms, "-")

    async def read() -> list[list[tuple[str, dict[str, str]]]]:
        async with store.redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.xrevrange(Slots.of(key_id).usage, upper, lower, count=query.limit + 1)
            return list(await pipe.execute())

    pages = await store.call(read)
    merged = heapq.merge(
        *(
            [(_order(entry_id), key_id, fields) for entry_id, fields in page]
            for key_id, page in zip(key_ids, pages, strict=True)
        ),
        key=lambda item: (item[0], item[1]),
        reverse=True,
    )
    wanted = [item for item in merged if _before_cursor(item, query.cursor)]
    page = [_shape(stream_id, key_id, f) for (_, stream_id), key_id, f in wanted[: query.limit]]
    following = wanted[query.limit] if len(wanted) > query.limit else None
    return page, (f"{following[0][1]}:{following[1]}" if following else None)


def _order(entry_id: str) -> tuple[tuple[int, int], str]:
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq)), entry_id


def _before_cursor(item: Any, cursor: tuple[str, str] | None) -> bool:
    """Drop records a previous page returned: same stream id, higher key id."""
    if cursor is None:
        return True
    (_, stream_id), key_id, _ = item
    return not (stream_id == cursor[0] and key_id > cursor[1])


def _bound(ms: int | None, default: str) -> str:
    return default if ms is None else str(ms)


def _prompt(fields: dict[str, str]) -> dict[str, Any]:
    if "prompt" not in fields:
        return {}
    return {"prompt": fields["prompt"], "prompt_version": int(fields["prompt_version"])}


def _shape(stream_id: str, key_id: str, fields: dict[str, str]) -> dict[str, Any]:
    ms = int(stream_id.partition("-")[0])
    return {
        "id": stream_id,
        "request_id": fields.get("request_id", ""),
        "key_id": key_id,
        "model": fields.get("model", ""),
        "provider": fields.get("provider", ""),
        "input_tokens": int(fields.get("input_tokens", 0)),
        "output_tokens": int(fields.get("output_tokens", 0)),
        "cost": to_usd(int(fields.get("cost", 0))),
        "cost_nano": int(fields.get("cost", 0)),
        "cached": fields.get("cached") == "1",
        **_prompt(fields),
        "at": datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z"),
    }


PERIODS = {"day": "d", "month": "m"}


async def totals(
    store: Store, key_ids: list[str] | None, period: str, since: str, until: str
) -> list[dict[str, Any]]:
    """Per key and model, per day or month: requests, tokens and cost (kept for good)."""
    if period not in PERIODS:
        raise BadRequest("period: 'day' or 'month'")
    ids = key_ids or await keys.key_ids(store)

    async def read() -> list[dict[str, str]]:
        async with store.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(Slots.of(key_id).totals)
            return list(await pipe.execute())

    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key_id, fields in zip(ids, await store.call(read), strict=True):
        for field, value in fields.items():
            kind, when, rest = field.split("|", 2)
            model, _, measure = rest.rpartition("|")
            if kind != PERIODS[period] or not since <= when <= until:
                continue
            row = rows.setdefault((when, key_id, model), _row(key_id, model, period, when))
            row[_MEASURES[measure]] = int(value)
    ordered = [rows[k] for k in sorted(rows)]
    for row in ordered:
        row["cost"] = to_usd(row["cost_nano"])
    return ordered


_MEASURES = {"requests": "requests", "input": "input_tokens", "output": "output_tokens",
             "cost": "cost_nano"}  # fmt: skip


def _row(key_id: str, model: str, period: str, when: str) -> dict[str, Any]:
    return {"key_id": key_id, "model": model, period: when, "requests": 0,
            "input_tokens": 0, "output_tokens": 0, "cost_nano": 0}  # fmt: skip
