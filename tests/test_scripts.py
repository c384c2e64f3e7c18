"""The Lua scripts on a real server: calendar, idempotent admission and settlement, leases."""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis import exceptions as redis_exceptions

from gateway import admission, keys
from gateway.admission import Gate
from gateway.errors import SpendCapReached, StoreUnavailable
from gateway.keys import KeySpec, Slots
from gateway.store import Store, load_script
from tests.servers import RedisServer

pytestmark = [pytest.mark.redis]

NANO = 10**9


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    store = Store(redis_url)
    yield store
    await store.close()


@pytest.fixture
def gate(store: Store) -> Gate:
    return Gate(store, lease_ms=60_000, retention_ms=86_400_000)


async def new_key(store: Store, **spec: Any) -> tuple[str, str]:
    raw, record = await keys.create(store, KeySpec(name="t", **spec))
    return raw, record["id"]


@pytest.mark.parametrize(
    "moment",
    [
        "1970-01-01",
        "1999-12-31",
        "2000-02-29",
        "2000-03-01",
        "2024-02-29",
        "2026-12-31",
        "2027-01-01",
        "2100-02-28",
        "2100-03-01",
    ],
)
async def test_day_and_month_match_the_calendar(store: Store, moment: str) -> None:
    script = store.redis.register_script(
        load_script("admit_request").split("local key_hash")[0]
        + "return month_of(tonumber(ARGV[1]))"
    )
    seconds = calendar.timegm(time.strptime(moment, "%Y-%m-%d"))
    days = store.redis.register_script(
        load_script("admit_request").split("local key_hash")[0] + "return day_of(tonumber(ARGV[1]))"
    )
    for offset in (0, 86_399):
        assert await script(keys=[], args=[seconds + offset]) == moment[:7]
        assert await days(keys=[], args=[seconds + offset]) == moment


async def test_admission_replay_reserves_once(
    store: Store, gate: Gate, redis_server: RedisServer
) -> None:
    raw, key_id = await new_key(store, rate_per_min=10, monthly_cap=1)
    first = await gate.admit(raw, "m", "res-1", 1000)
    again = await gate.admit(raw, "m", "res-1", 1000)
    client = redis_server.client()
    assert (first.reserved, again.reserved) == (1000, 1000)
    assert client.hget(Slots.of(key_id).spend, "reserved") == "1000"
    assert client.zcard(Slots.of(key_id).window) == 1


async def test_settlement_replay_charges_once(
    store: Store, gate: Gate, redis_server: RedisServer
) -> None:
    raw, key_id = await new_key(store)
    ticket = await gate.admit(raw, "m", "res-2", 5000)
    record = {"model": "m", "provider": "p", "input_tokens": 1, "output_tokens": 2, "cached": 0}
    await gate.settle(ticket, 1234, record)
    await gate.settle(ticket, 1234, record)
    client = redis_server.client()
    spend = client.hgetall(Slots.of(key_id).spend)
    assert (spend["total"], spend["reserved"]) == ("1234", "0")
    assert client.xlen(Slots.of(key_id).usage) == 1


async def test_expired_lease_gives_capacity_back(
    store: Store, gate: Gate, redis_server: RedisServer
) -> None:
    raw, key_id = await new_key(store, hard_cap=0.000003)  # 3000 nano-USD
    await gate.admit(raw, "m", "dead-worker", 3000)
    with pytest.raises(SpendCapReached):
        await gate.admit(raw, "m", "blocked", 3000)

    client = redis_server.client()
    client.zadd(Slots.of(key_id).lease, {"dead-worker": 0})  # its lease ran out long ago
    ticket = await gate.admit(raw, "m", "after-expiry", 3000)
    assert ticket.reserved == 3000
    assert client.hget(Slots.of(key_id).spend, "reserved") == "3000"


async def test_late_settlement_after_expiry_charges_without_double_release(
    store: Store, gate: Gate, redis_server: RedisServer
) -> None:
    raw, key_id = await new_key(store)
    slow = await gate.admit(raw, "m", "slow-worker", 4000)
    client = redis_server.client()
    client.zadd(Slots.of(key_id).lease, {"slow-worker": 0})
    await gate.admit(raw, "m", "purger", 100)  # purges the expired lease
    await gate.settle(slow, 2500, {"model": "m"})
    spend = client.hgetall(Slots.of(key_id).spend)
    assert (spend["total"], spend["reserved"]) == ("2500", "100")


@pytest.mark.parametrize("cap", ["monthly_cap", "hard_cap"])
async def test_late_settlement_after_expiry_is_cut_to_fit_the_cap(
    store: Store, gate: Gate, redis_server: RedisServer, cap: str
) -> None:
    """A lease that ran out gave its capacity to another request; the late settlement
    must not take the key over its cap (with the cut amount in the usage record)."""
    raw, key_id = await new_key(store, **{cap: 0.00001})  # 10_000 nano-USD
    slow = await gate.admit(raw, "m", "slow-worker", 6000)
    client = redis_server.client()
    client.zadd(Slots.of(key_id).lease, {"slow-worker": 0})
    fresh = await gate.admit(raw, "m", "fresh", 7000)  # fits only because the lease expired
    await gate.settle(fresh, 7000, {"model": "m"})
    await gate.settle(slow, 6000, {"model": "m"})
    spend = client.hgetall(Slots.of(key_id).spend)
    assert (spend["total"], spend["reserved"]) == ("10000", "0")
    costs = [int(fields["cost"]) for _, fields in client.xrange(Slots.of(key_id).usage)]
    assert sorted(costs) == [3000, 7000]
    with pytest.raises(SpendCapReached):
        await gate.admit(raw, "m", "after", 1)


async def test_late_settlement_counts_open_reservations_against_the_cap(
    store: Store, gate: Gate, redis_server: RedisServer
) -> None:
    raw, key_id = await new_key(store, monthly_cap=0.00001)
    slow = await gate.admit(raw, "m", "slow-worker", 6000)
    client = redis_server.client()
    client.zadd(Slots.of(key_id).lease, {"slow-worker": 0})
    held = await gate.admit(raw, "m", "held", 8000)  # still open when the late one lands
    await gate.settle(slow, 6000, {"model": "m"})
    await gate.settle(held, 8000, {"model": "m"})
    spend = client.hgetall(Slots.of(key_id).spend)
    assert (spend["total"], spend["reserved"]) == ("10000", "0")


async def test_monthly_cap_counts_only_this_month(
    store: Store, gate: Gate, redis_server: RedisServer
) -> None:
    raw, key_id = await new_key(store, monthly_cap=0.00001)  # 10_000 nano-USD
    redis_server.client().hset(Slots.of(key_id).spend, "m:2000-01", 10 * NANO)
    assert (await gate.admit(raw, "m", "r", 10_000)).reserved == 10_000
    with pytest.raises(SpendCapReached, match="monthly"):
        await gate.admit(raw, "m", "r2", 1)


def cap_used(key_id: str) -> float | None:
    return REGISTRY.get_sample_value("gateway_key_cap_used_ratio", {"key": key_id})


async def test_admission_reports_the_tighter_cap_in_use(store: Store, gate: Gate) -> None:
    raw, key_id = await new_key(store, monthly_cap=0.00001, hard_cap=0.0001)  # 10k, 100k nano
    ticket = await gate.admit(raw, "m", "r1", 4000)
    assert cap_used(key_id) == 0.4  # the monthly share (4,000 / 10,000), not the lifetime
    await gate.settle(ticket, 2500, {"model": "m"})
    await gate.admit(raw, "m", "r2", 5000)
    assert cap_used(key_id) == 0.75  # 2,500 settled + 5,000 held, this one included
    with pytest.raises(SpendCapReached):
        await gate.admit(raw, "m", "r3", 3000)
    assert cap_used(key_id) == 0.75  # a refusal counts what is held, not what it asked
    await gate.admit(raw, "m", "r2", 5000)  # a replay decides nothing new
    assert cap_used(key_id) == 0.75

    free, free_id = await new_key(store)
    await gate.admit(free, "m", "r", 4000)
    assert cap_used(free_id) is None  # no cap, no ratio
    quiet = Gate(store, lease_ms=60_000, retention_ms=86_400_000, key_labels=False)
    raw, key_id = await new_key(store, hard_cap=0.0001)
    await quiet.admit(raw, "m", "r", 4000)
    assert cap_used(key_id) is None


async def test_unknown_and_wrong_hash_are_unauthorized(store: Store, gate: Gate) -> None:
    from gateway.errors import Unauthorized

    raw, _ = await new_key(store)
    with pytest.raises(Unauthorized):
        await gate.admit(keys.mint(), "m", "r", 1)
    forged = raw[:-1] + ("A" if raw[-1] != "A" else "B")
    with pytest.raises(Unauthorized):
        await gate.admit(forged, "m", "r", 1)


async def test_prompt_push_replay_adds_one_version(store: Store) -> None:
    """A push resent with its push id (its first answer lost) gets the same version."""
    slots = ["gw:prompt:{replay}:meta", "gw:prompt:{replay}:versions"]
    first = await store.run("add_prompt_version", slots, ["v1 text", "push-a"])
    again = await store.run("add_prompt_version", slots, ["v1 text", "push-a"])
    other = await store.run("add_prompt_version", slots, ["v2 text", "push-b"])
    assert (first, again, other) == ([1, 1], [1, 1], [2, 1])
    assert await store.redis.hget(slots[0], "latest") == "2"
    assert await store.redis.hlen(slots[1]) == 2


@pytest.mark.parametrize(
    ("cost", "tokens"), [(-5, 1), (10**20, 1), (5, -1), (5, 10**20), (5, "1.5")]
)
async def test_settlement_refuses_bad_amounts_before_writing(
    store: Store, gate: Gate, cost: int, tokens: object
) -> None:
    """The script checks its numbers first: a bad one changes nothing, not half the books."""
    raw, key_id = await new_key(store)
    ticket = await gate.admit(raw, "m", "bad-amounts", 1000)
    slots = Slots.of(key_id)
    before = await store.redis.hgetall(slots.spend), await store.redis.hgetall(slots.resv)
    record = {"model": "m", "input_tokens": tokens, "output_tokens": 1}
    with pytest.raises(redis_exceptions.ResponseError, match="whole numbers"):
        await gate._settle(ticket, cost, record, 0)
    after = await store.redis.hgetall(slots.spend), await store.redis.hgetall(slots.resv)
    assert after == before and await store.redis.xlen(slots.usage) == 0


async def test_a_settlement_whose_answers_are_lost_charges_once_however_long_it_retries(
    store: Store, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attempt runs on the server and its answer is lost, so the gate retries. The
    first leaves the settled mark; admissions on the key sweep it once it expires. A retry
    landing after that would find neither reservation nor mark and charge again."""
    monkeypatch.setattr(admission, "SETTLED_MARK_MS", 1500)
    monkeypatch.setattr(admission, "CLOCK_MARGIN_MS", 100)
    monkeypatch.setattr(admission, "_SETTLE_RETRY_SECONDS", (0.05, 0.2, 0.4, 0.6, 0.8, 1.0))
    store.deadline, store.in_flight_seconds = 0.2, 0.25
    gate = Gate(store, lease_ms=60_000, retention_ms=86_400_000)
    raw, key_id = await new_key(store)
    ticket = await gate.admit(raw, "m", "lost-answers", 5000)
    run, attempts = store.run, []

    async def answer_lost(name: str, keys: list[str], args: list[Any]) -> Any:
        if name != "settle_request":
            return await run(name, keys, args)
        attempts.append(time.monotonic())
        await gate.admit(raw, "m", f"sweeper-{len(attempts)}", 1)  # sweeps expired marks
        await run(name, keys, args)
        raise StoreUnavailable("the answer was lost")

    monkeypatch.setattr(store, "run", answer_lost)
    await gate.settle(ticket, 1234, {"model": "m", "input_tokens": 1, "output_tokens": 2})
    await gate.drain()

    client = redis_server.client()
    assert client.xlen(Slots.of(key_id).usage) == 1
    assert client.hget(Slots.of(key_id).spend, "total") == "1234"
    assert 2 <= len(attempts) < 7  # it retried, and stopped before the mark could be gone
    assert attempts[-1] - attempts[0] < 1.5 - 0.45


async def test_a_settlement_delivered_after_its_bound_is_refused_not_charged_twice(
    store: Store, gate: Gate, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network may hold a sent command past any timeout (a partition, a proxy) and
    deliver it after the first attempt's mark was swept. It carries its bound in Redis
    time, so the script refuses it instead of charging again."""
    monkeypatch.setattr(admission, "SETTLED_MARK_MS", 1500)
    monkeypatch.setattr(admission, "CLOCK_MARGIN_MS", 500)
    raw, key_id = await new_key(store)
    ticket = await gate.admit(raw, "m", "held-by-the-network", 5000)
    record = {"model": "m", "input_tokens": 1, "output_tokens": 2}
    await gate.settle(ticket, 1234, record)  # lands; its answer reached us too

    bound = admission._valid_until(ticket, asyncio.get_running_loop().time())
    await asyncio.sleep(1.6)
    await gate.admit(raw, "m", "sweeper", 1)  # the mark has expired: swept
    client = redis_server.client()
    assert client.hget(Slots.of(key_id).resv, "held-by-the-network") is None
    await gate._settle(ticket, 1234, record, bound)  # the copy the network held

    assert client.xlen(Slots.of(key_id).usage) == 1
    assert client.hget(Slots.of(key_id).spend, "total") == "1234"
