"""The gateway on a real Redis Cluster of three masters started by the tests."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway import config as config_module
from gateway.app import create_app
from tests.conftest import config_dict
from tests.servers import RedisClusterServers, ThreadServer
from tests.test_admission import burst
from tests.upstreams import Upstream

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(3).start()
    yield servers
    servers.stop()


@pytest.fixture
def cluster_gateway(
    cluster: RedisClusterServers, upstreams: dict[str, Upstream], admin_key: str
) -> Iterator[tuple[str, httpx.Client]]:
    for node in cluster.nodes:
        node.client().flushall()
    config = config_module.parse(config_dict(upstreams), "test")
    server = ThreadServer(create_app(config, cluster.url)).start()
    headers = {"authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=server.url + "/api/ai-gateway", headers=headers) as admin:
        yield server.url, admin
    server.stop()


def owner(cluster: RedisClusterServers, name: str) -> int:
    """Index of the node that holds the Redis key `name`."""
    client = cluster.nodes[0].client()
    slot = client.execute_command("CLUSTER", "KEYSLOT", name)
    for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return next(i for i, n in enumerate(cluster.nodes) if n.port == int(primary[1]))
    raise AssertionError(f"no node owns slot {slot}")


def test_cluster_serves_completions_and_bills_them(
    cluster_gateway: tuple[str, httpx.Client], cluster: RedisClusterServers
) -> None:
    url, admin = cluster_gateway
    created = admin.post("/keys", json={"name": "c", "rate_per_min": 50}).json()
    client = openai.OpenAI(base_url=url + "/v1", api_key=created["key"], max_retries=0)
    plain = client.chat.completions.create(
        model="fallback", messages=[{"role": "user", "content": "on the cluster"}]
    )
    streamed = client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "streamed"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert plain.choices[0].message.content == "echo: on the cluster"
    assert text == "echo: streamed"

    key_id = created["record"]["id"]
    records = admin.get("/usage").json()["records"]
    spend = admin.get(f"/keys/{key_id}").json()["spend"]
    assert len(records) == 2
    assert spend == pytest.approx(sum(r["cost"] for r in records))


async def test_cluster_rate_limit_is_exact(cluster_gateway: tuple[str, httpx.Client]) -> None:
    url, admin = cluster_gateway
    key = admin.post("/keys", json={"name": "r", "rate_per_min": 20}).json()["key"]
    statuses = await burst(url, key, 60)
    assert (statuses.count(200), statuses.count(429)) == (20, 40), sorted(statuses)


def test_cluster_one_key_on_one_shard_keys_on_every_shard(
    cluster_gateway: tuple[str, httpx.Client], cluster: RedisClusterServers
) -> None:
    url, admin = cluster_gateway
    shards = set()
    for i in range(24):
        created = admin.post("/keys", json={"name": f"k{i}", "rate_per_min": 5}).json()
        httpx.post(
            url + "/v1/chat/completions",
            json={"model": "gpt", "messages": [{"role": "user", "content": "x"}]},
            headers={"authorization": f"Bearer {created['key']}"},
        )
        tag = f"gw:{{{created['record']['id']}}}"
        parts = ("key", "window", "spend", "resv", "lease", "usage", "totals")
        names = [f"{tag}:{part}" for part in parts]
        holders = {owner(cluster, name) for name in names}
        assert len(holders) == 1, f"{tag} is split over shards {holders}"
        shards |= holders
    assert shards == {0, 1, 2}


def test_cluster_recovers_from_script_flush(
    cluster_gateway: tuple[str, httpx.Client], cluster: RedisClusterServers
) -> None:
    url, admin = cluster_gateway
    keys = [admin.post("/keys", json={"name": f"f{i}"}).json()["key"] for i in range(6)]
    for node in cluster.nodes:
        node.client().script_flush()
    for i, key in enumerate(keys):
        response = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "gpt", "messages": [{"role": "user", "content": f"after flush {i}"}]},
            headers={"authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200, response.text


def test_cluster_prices_and_prompts(cluster_gateway: tuple[str, httpx.Client]) -> None:
    _, admin = cluster_gateway
    assert admin.put("/prices/gpt", json={"input_per_1k": 0, "output_per_1k": 1}).status_code == 200
    assert admin.get("/prices/gpt").json()["output_per_1k"] == 1.0
    admin.post("/prompts/p", json={"template": "v1 {{x}}"})
    admin.post("/prompts/p", json={"template": "v2 {{x}}"})
    admin.post("/prompts/p/activate", json={"version": 2})
    rendered = admin.post("/prompts/p/render", json={"variables": {"x": "ok"}}).json()
    assert rendered == {"text": "v2 ok", "version": 2}
    assert [p["name"] for p in admin.get("/prompts").json()["prompts"]] == ["p"]
