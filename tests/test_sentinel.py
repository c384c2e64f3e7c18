"""Redis Sentinel: the gateway follows a failover without a restart, and what WAIT buys."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway import config as config_module
from gateway.app import create_app
from tests.conftest import config_dict
from tests.servers import SentinelGroup, ThreadServer, wait_until
from tests.test_admission import burst
from tests.upstreams import Upstream

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    servers = SentinelGroup().start()
    yield servers
    servers.stop()


def gateway_on(group: SentinelGroup, upstreams: dict[str, Upstream], **store: Any) -> ThreadServer:
    raw = config_dict(upstreams, store=store) if store else config_dict(upstreams)
    return ThreadServer(create_app(config_module.parse(raw, "test"), group.url)).start()


def chat(url: str, key: str, text: str) -> int:
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "gpt", "messages": [{"role": "user", "content": text}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    return response.status_code


def test_gateway_follows_a_failover(
    group: SentinelGroup, upstreams: dict[str, Upstream], admin_key: str
) -> None:
    server = gateway_on(group, upstreams)
    try:
        headers = {"authorization": f"Bearer {admin_key}"}
        created = httpx.post(
            server.url + "/api/ai-gateway/keys", json={"name": "s"}, headers=headers
        ).json()
        key = created["key"]
        assert chat(server.url, key, "before") == 200
        wait_until(lambda: group.replica.client().exists(f"gw:{{{created['record']['id']}}}:key"))

        old_master = group.master.port
        group.master.kill()
        killed = time.monotonic()
        statuses = []
        while time.monotonic() - killed < 30:
            statuses.append(chat(server.url, key, f"during {len(statuses)}"))
            if statuses[-1] == 200:
                break
            time.sleep(0.2)
        assert statuses[-1] == 200, statuses
        assert set(statuses) <= {200, 503}, "a failover must show as 503s, never a 500"
        assert group.master_port() != old_master
        record = httpx.get(
            server.url + f"/api/ai-gateway/keys/{created['record']['id']}", headers=headers
        ).json()
        assert record["spend"] > 0
    finally:
        server.stop()


async def test_wait_replicas_loses_no_settled_spend(
    group: SentinelGroup, upstreams: dict[str, Upstream], admin_key: str
) -> None:
    """With store.wait_replicas=1 every answered request is on the replica before the reply,
    so the promoted replica holds every charge: the gateway reads them all back from it."""
    server = gateway_on(group, upstreams, wait_replicas=1, wait_timeout_ms=1000)
    try:
        headers = {"authorization": f"Bearer {admin_key}"}
        created = httpx.post(
            server.url + "/api/ai-gateway/keys", json={"name": "w"}, headers=headers
        ).json()
        statuses = await burst(server.url, created["key"], 40)
        group.master.kill()  # at once: anything not yet replicated would be lost
        answered = statuses.count(200)
        wait_until(lambda: group.master_port() == group.replica.port, timeout=30)
        key_id = created["record"]["id"]
        assert group.replica.client().xlen(f"gw:{{{key_id}}}:usage") == answered == 40

        admin = f"{server.url}/api/ai-gateway"
        wait_until(lambda: httpx.get(f"{admin}/keys/{key_id}", headers=headers).is_success)
        record = httpx.get(f"{admin}/keys/{key_id}", headers=headers).json()
        usage = httpx.get(f"{admin}/usage", params={"key": key_id}, headers=headers).json()
        assert len(usage["records"]) == 40
        assert round(record["spend"] * 1e9) == sum(r["cost_nano"] for r in usage["records"]) > 0
    finally:
        server.stop()
