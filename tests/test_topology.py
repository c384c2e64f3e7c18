"""Many replicas, one quota: three `gateway serve` processes (two workers each) behind
nginx (deploy/nginx.conf), on one Redis or on a three-master cluster."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from tests.conftest import UPSTREAM_KEYS, config_dict, write_config
from tests.servers import GatewayProcess, Nginx, RedisClusterServers, RedisServer, wait_until
from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

FLAT = {"input_per_1k": 0, "output_per_1k": 0.002, "max_output_tokens": 64}
REQUEST_COST_NANO = 20 * 2_000  # 20 output tokens at $0.002 per 1K


class Topology:
    def __init__(self, replicas: list[GatewayProcess], balancer: Nginx, admin_key: str) -> None:
        self.replicas = replicas
        self.balancer = balancer
        self.url = balancer.url
        self.admin = httpx.Client(
            base_url=self.url + "/api/ai-gateway",
            headers={"authorization": f"Bearer {admin_key}"},
            timeout=30,
        )

    def key(self, **spec: Any) -> tuple[str, str]:
        created = self.admin.post("/keys", json={"name": "t", **spec}).json()
        return created["key"], created["record"]["id"]


def launch(
    tmp_path: Path, store_url: str, upstreams: dict[str, Upstream], admin_key: str, **limits: Any
) -> Topology:
    raw = config_dict(upstreams, limits=limits) if limits else config_dict(upstreams)
    raw["models"]["flat"] = {**FLAT, "routes": [{"provider": "openai", "model": "up"}]}
    path = write_config(tmp_path / "gateway.yaml", raw)
    env = {"GATEWAY_REDIS_URL": store_url, "GATEWAY_ADMIN_KEY": admin_key, **UPSTREAM_KEYS}
    replicas = [GatewayProcess(path, env, workers=2).launch() for _ in range(3)]
    for replica in replicas:
        replica.wait_ready()
    upstream_addresses = [f"127.0.0.1:{r.port}" for r in replicas]
    balancer = Nginx(tmp_path / "nginx", upstream_addresses).start()
    return Topology(replicas, balancer, admin_key)


def shut(topology: Topology) -> None:
    topology.admin.close()
    topology.balancer.stop()
    for index, replica in enumerate(topology.replicas):
        print(f"--- replica {index} logged:\n{replica.stop()}")  # shown when a test fails


@pytest.fixture(params=["single", "cluster"])
def store_url(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    if request.param == "single":
        yield redis_url
        return
    cluster = RedisClusterServers(3).start()
    yield cluster.url
    cluster.stop()


@pytest.fixture
def topology(
    tmp_path: Path, store_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> Iterator[Topology]:
    deployed = launch(tmp_path, store_url, upstreams, admin_key)
    yield deployed
    shut(deployed)


async def flood(
    url: str, keys: list[str], count: int, model: str = "gpt", **extra: Any
) -> list[tuple[str, int]]:
    """`count` requests at once through `url`, spread over `keys`: (key, status) pairs.

    aiohttp drives the load: httpx's pool slows down quadratically past a few hundred
    connections and would measure itself, not the gateway.
    """
    connector = aiohttp.TCPConnector(limit=500)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one(i: int) -> tuple[str, int]:
            key = keys[i % len(keys)]
            body = {"model": model, "messages": [{"role": "user", "content": f"r{i}"}], **extra}
            headers = {"authorization": f"Bearer {key}"}
            async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
                return key, r.status

        return await asyncio.gather(*(one(i) for i in range(count)))


async def test_three_replicas_admit_exactly_the_rate_limit(topology: Topology) -> None:
    key, key_id = topology.key(rate_per_min=100)
    results = await flood(topology.url, [key], 2000)
    statuses = [status for _, status in results]
    assert (statuses.count(200), statuses.count(429)) == (100, 1900), sorted(set(statuses))
    served = topology.admin.get("/usage", params={"key": key_id, "limit": 1000}).json()
    assert len(served["records"]) == 100


async def test_caps_hold_for_many_keys_through_the_balancer(
    topology: Topology, upstreams: dict[str, Upstream]
) -> None:
    upstreams["openai"].reply = " ".join(f"w{i}" for i in range(100))
    caps = {}
    for i in range(12):
        per_key = 3 + i % 5  # each request costs exactly its reservation: 20 output tokens
        key, key_id = topology.key(monthly_cap=(per_key + 0.5) * REQUEST_COST_NANO / 1e9)
        caps[key] = (key_id, per_key)
    results = await flood(topology.url, list(caps), 600, model="flat", max_tokens=20)

    for key, (key_id, per_key) in caps.items():
        statuses = [status for k, status in results if k == key]
        assert statuses.count(200) == per_key, sorted(set(statuses))
        assert statuses.count(402) == len(statuses) - per_key, sorted(set(statuses))
        record = topology.admin.get(f"/keys/{key_id}").json()
        usage = topology.admin.get("/usage", params={"key": key_id, "limit": 1000}).json()
        assert record["reserved"] == 0
        assert round(record["spend"] * 1e9) == sum(r["cost_nano"] for r in usage["records"])
        assert round(record["spend"] * 1e9) == per_key * REQUEST_COST_NANO


def test_sigkilled_replica_gives_its_reservations_back(
    tmp_path: Path,
    redis_url: str,
    redis_server: RedisServer,
    upstreams: dict[str, Upstream],
    admin_key: str,
) -> None:
    """A lease is request_timeout + lease_margin = 2 s here; the capacity comes back then."""
    deployed = launch(
        tmp_path, redis_url, upstreams, admin_key,
        request_timeout_seconds=1, lease_margin_seconds=1,
    )  # fmt: skip
    try:
        upstreams["openai"].delay_seconds = 30
        key, key_id = deployed.key(hard_cap=2.5 * REQUEST_COST_NANO / 1e9)
        victim, survivor = deployed.replicas[0], deployed.replicas[1]
        body = {"model": "flat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20}
        headers = {"authorization": f"Bearer {key}"}
        for _ in range(2):  # two requests hang on the victim, holding the whole cap
            _fire(victim.url, body, headers)
        spend = f"gw:{{{key_id}}}:spend"
        held = 2 * REQUEST_COST_NANO
        wait_until(lambda: int(redis_server.client().hget(spend, "reserved") or 0) == held)
        victim.kill_all()
        killed = time.monotonic()

        upstreams["openai"].delay_seconds = 0
        refused = httpx.post(survivor.url + "/v1/chat/completions", json=body, headers=headers)
        assert refused.status_code == 402
        wait_until(
            lambda: (
                httpx.post(
                    survivor.url + "/v1/chat/completions", json=body, headers=headers
                ).status_code
                == 200
            ),
            timeout=10,
            interval=0.1,
        )
        assert time.monotonic() - killed <= 2 + 1.5  # the lease, plus polling slack
    finally:
        shut(deployed)


def _fire(url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    """Send a request and walk away without waiting for the answer."""

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)

    threading.Thread(target=send, daemon=True).start()


def _refuses(port: int) -> bool:
    """A new connection to `port` is refused (a connection that opens is closed again)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_in_flight_requests(
    tmp_path: Path,
    redis_url: str,
    redis_server: RedisServer,
    upstreams: dict[str, Upstream],
    admin_key: str,
) -> None:
    """After SIGTERM the replica refuses new connections (nginx passes them to another one)
    while it finishes and settles what it had in flight, then exits 0."""
    deployed = launch(tmp_path, redis_url, upstreams, admin_key)
    try:
        key, key_id = deployed.key()
        other_key, _ = deployed.key()
        replica = deployed.replicas[0]
        upstreams["openai"].delay_seconds = 3

        async def in_flight() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(base_url=replica.url, timeout=60) as http:

                async def one(i: int) -> tuple[int, str]:
                    body = {"model": "gpt", "messages": [{"role": "user", "content": f"d{i}"}],
                            "stream": i % 2 == 0}  # fmt: skip
                    response = await http.post(
                        "/v1/chat/completions", json=body,
                        headers={"authorization": f"Bearer {key}"},
                    )  # fmt: skip
                    return response.status_code, response.text

                tasks = [asyncio.create_task(one(i)) for i in range(10)]
                await asyncio.sleep(0.5)  # all admitted and waiting on the upstream
                assert replica.process is not None
                replica.process.send_signal(signal.SIGTERM)

                await asyncio.to_thread(wait_until, lambda: _refuses(replica.port), timeout=2)
                assert not any(task.done() for task in tasks), "refused while in flight"
                through_balancer = await flood(deployed.url, [other_key], 6, model="mock-echo")
                assert [status for _, status in through_balancer] == [200] * 6
                assert not any(task.done() for task in tasks), "still draining"
                return await asyncio.gather(*tasks)

        answers = asyncio.run(in_flight())
        assert [status for status, _ in answers] == [200] * 10
        for i, (_, text) in enumerate(answers):
            assert f"d{i}" in text and '"error"' not in text
            assert text.rstrip().endswith("[DONE]") == (i % 2 == 0)
        assert replica.process is not None
        assert replica.process.wait(timeout=30) == 0
        spend = redis_server.client().hgetall(f"gw:{{{key_id}}}:spend")
        assert int(spend.get("reserved", 0)) == 0
        assert redis_server.client().xlen(f"gw:{{{key_id}}}:usage") == 10
    finally:
        shut(deployed)
