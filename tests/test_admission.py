"""Exact rate limits and hard spend caps under concurrency, against real Redis and HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway import admission
from gateway.admission import Gate
from gateway.store import Store
from gateway.store.wire import ATTEMPTS
from tests.conftest import UPSTREAM_KEYS, config_dict, write_config
from tests.servers import GatewayProcess, RedisServer, wait_until
from tests.test_routing import spend_state
from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

LONG_TEXT = " ".join(f"w{i}" for i in range(200))
# Input is free and the answer always uses all of max_tokens, so a request costs exactly
# what it reserves: 50 tokens * $0.002 / 1K = $0.0001.
FLAT = {"input_per_1k": 0, "output_per_1k": 0.002, "max_output_tokens": 256}
REQUEST_COST_NANO = 100_000


async def burst(url: str, key: str, count: int, **extra: Any) -> list[int]:
    """`count` concurrent, distinct (so uncached) chat completions; their status codes."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        headers = {"authorization": f"Bearer {key}"}
        responses = await asyncio.gather(
            *(
                http.post("/v1/chat/completions", json=_body(i, extra), headers=headers)
                for i in range(count)
            )
        )
    return [r.status_code for r in responses]


def _body(i: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"model": "gpt", "messages": [{"role": "user", "content": f"hi {i}"}], **extra}


def age_window(redis_server: RedisServer, key_id: str, entries: int, seconds: float) -> None:
    """Move the oldest `entries` of a key's window `seconds` into the past."""
    client = redis_server.client()
    window = f"gw:{{{key_id}}}:window"
    for member, score in client.zrange(window, 0, entries - 1, withscores=True):
        client.zadd(window, {member: score - seconds * 1_000_000})


async def test_rate_limit_exact_under_burst(
    gateway_url: str, mint: Any, redis_server: RedisServer
) -> None:
    key, _ = mint(rate_per_min=7)
    statuses = await burst(gateway_url, key, 21)
    assert statuses.count(200) == 7
    assert statuses.count(429) == 14


def test_rate_limit_429_has_retry_after_and_sdk_raises(gateway_url: str, mint: Any) -> None:
    key, _ = mint(rate_per_min=1)
    client = openai.OpenAI(base_url=gateway_url + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "b"}])
    headers = raised.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert raised.value.body["code"] == "rate_limit_exceeded"


async def test_rate_limit_window_slides(
    gateway_url: str, mint: Any, redis_server: RedisServer
) -> None:
    key, key_id = mint(rate_per_min=5)
    assert (await burst(gateway_url, key, 5)).count(200) == 5
    assert await burst(gateway_url, key, 1) == [429]

    age_window(redis_server, key_id, 2, 59.0)  # still inside the window: nothing frees
    assert await burst(gateway_url, key, 1) == [429]

    age_window(redis_server, key_id, 2, 1.5)  # now 60.5 s old: exactly two slots free up
    assert sorted(await burst(gateway_url, key, 4)) == [200, 200, 429, 429]


async def test_rejected_requests_are_not_recorded(
    gateway_url: str, mint: Any, redis_server: RedisServer
) -> None:
    key, key_id = mint(rate_per_min=3)
    await burst(gateway_url, key, 30)
    assert redis_server.client().zcard(f"gw:{{{key_id}}}:window") == 3


@pytest.fixture
def two_gateways(
    tmp_path: Path, redis_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> Iterator[list[GatewayProcess]]:
    """Two `gateway serve` processes on one Redis. (Two workers of one process would not
    do: one worker's accept loop can take a whole burst of new connections.)"""
    raw = config_dict(upstreams)
    raw["models"]["gpt"] = {**FLAT, "routes": [{"provider": "openai", "model": "gpt-up"}]}
    path = write_config(tmp_path / "gateway.yaml", raw)
    env = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_ADMIN_KEY": admin_key, **UPSTREAM_KEYS}
    env["GATEWAY_LOG_FORMAT"] = "json"
    processes = [GatewayProcess(path, env, workers=1).launch() for _ in range(2)]
    for process in processes:
        process.wait_ready()
    yield processes
    for process in processes:
        process.stop()


async def test_monthly_cap_holds_across_two_processes(
    two_gateways: list[GatewayProcess],
    admin_key: str,
    upstreams: dict[str, Upstream],
    redis_server: RedisServer,
) -> None:
    upstreams["openai"].reply = LONG_TEXT
    headers = {"authorization": f"Bearer {admin_key}"}
    admin = httpx.Client(base_url=two_gateways[0].url + "/api/ai-gateway", headers=headers)
    created = admin.post("/keys", json={"name": "capped", "monthly_cap": 0.00105}).json()
    key, key_id = created["key"], created["record"]["id"]

    halves = await asyncio.gather(
        *(burst(gateway.url, key, 25, max_tokens=50) for gateway in two_gateways)
    )
    statuses = [status for half in halves for status in half]

    assert statuses.count(200) == 10  # 10 * $0.0001 fits under $0.00105; an 11th would not
    assert statuses.count(402) == 40
    record = admin.get(f"/keys/{key_id}").json()
    records = admin.get("/usage", params={"key": key_id, "limit": 1000}).json()["records"]
    assert record["spend"] == pytest.approx(0.001)
    assert record["spend_month"] == record["spend"]
    assert record["reserved"] == 0
    assert len(records) == 10
    settled = int(redis_server.client().hget(f"gw:{{{key_id}}}:spend", "total"))
    assert settled == sum(r["cost_nano"] for r in records) == 10 * REQUEST_COST_NANO
    assert {r["provider"] for r in records} == {"openai"}
    # Each process decided on its half: the cap held across processes, not within one.
    deciding = set()
    for gateway in two_gateways:
        logged = Path(gateway.log.name).read_text().splitlines()
        lines = [json.loads(line) for line in logged if line.startswith("{")]
        pids = {line["pid"] for line in lines if line.get("path") == "/v1/chat/completions"}
        assert len(pids) == 1
        deciding |= pids
    assert len(deciding) == 2


async def test_settlement_attempts_land_inside_the_settled_mark_with_the_shipped_settings() -> None:
    """The first attempt has no timer of its own: the wire may send it ATTEMPTS times, each
    after a connect and an in-flight deadline; all of it must land while the mark of the
    first landing lives. A store that refuses connections (each attempt fails at once)
    still gets every retry of the schedule, over more than half a minute."""
    store = Store("redis://127.0.0.1:6379/0")  # never connected
    gate = Gate(store, lease_ms=330_000, retention_ms=86_400_000)
    mark = (admission.SETTLED_MARK_MS - admission.CLOCK_MARGIN_MS) / 1000
    try:
        assert ATTEMPTS * (store.deadline + store.in_flight_seconds) < mark
        assert 30 < sum(admission._SETTLE_RETRY_SECONDS) < mark - gate.retry_reach
    finally:
        await store.close()


async def test_the_answer_does_not_wait_for_settlement_and_the_reservation_holds_until_it_does(
    gateway_url: str, mint: Any, redis_server: RedisServer, upstreams: dict[str, Upstream]
) -> None:
    """Settlement runs once the response is written. While it has not landed (here: Redis
    refuses writes for a while), the reservation still counts against the caps."""
    key, key_id = mint()
    upstreams["openai"].delay_seconds = 0.5
    redis = redis_server.client()
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as http:
        call = asyncio.create_task(
            http.post("/v1/chat/completions", json=_body(0, {}), headers=headers)
        )
        await asyncio.to_thread(wait_until, lambda: spend_state(redis_server, key_id)[1] > 0)
        # Writes wait (reads are still answered) for less than a store command may take.
        redis.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        try:
            response = await call
            settled, reserved, records = spend_state(redis_server, key_id)
        finally:
            redis.execute_command("CLIENT", "UNPAUSE")
    assert response.status_code == 200
    assert (settled, records) == (0, 0) and reserved > 0  # answered, not yet settled
    cost = round(float(response.headers["x-gateway-cost"]) * 1e9)
    await asyncio.to_thread(wait_until, lambda: spend_state(redis_server, key_id) == (cost, 0, 1))


async def test_a_settlement_that_fails_after_the_answer_is_logged_and_the_worker_serves_on(
    gateway_url: str,
    mint: Any,
    redis_server: RedisServer,
    upstreams: dict[str, Upstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A settlement the store rejects (not one it is away for) fails after the response
    is out: the client has its answer, the failure is logged, and the worker goes on."""
    key, key_id = mint()
    upstreams["openai"].delay_seconds = 0.5
    redis = redis_server.client()
    headers = {"authorization": f"Bearer {key}"}
    resv = f"gw:{{{key_id}}}:resv"
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as http:
        call = asyncio.create_task(
            http.post("/v1/chat/completions", json=_body(0, {}), headers=headers)
        )
        await asyncio.to_thread(wait_until, lambda: spend_state(redis_server, key_id)[1] > 0)
        redis.delete(resv)
        redis.set(resv, "not a hash")  # the settle script's first read now fails: WRONGTYPE
        response = await call
        assert response.status_code == 200
        await asyncio.to_thread(
            wait_until, lambda: "failed" in " ".join(r.getMessage() for r in caplog.records)
        )
        redis.delete(resv)
        upstreams["openai"].delay_seconds = 0
        again = await http.post("/v1/chat/completions", json=_body(1, {}), headers=headers)
    failed = [r for r in caplog.records if r.getMessage().startswith("settlement of")]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert "WRONGTYPE" in str(failed[0].exc_info[1])
    assert again.status_code == 200
    # The second request was settled; the first one's reservation waits for its lease.
    await asyncio.to_thread(wait_until, lambda: spend_state(redis_server, key_id)[2] == 1)
