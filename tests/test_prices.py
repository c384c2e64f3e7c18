"""The price book: config defaults, overridden at run time on every replica."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway import config as config_module
from gateway.app import create_app
from tests.conftest import config_dict
from tests.servers import ThreadServer, wait_until
from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture
def replicas(
    redis_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> Iterator[list[httpx.Client]]:
    """Two gateway replicas on one store, as admin clients."""
    config = config_module.parse(config_dict(upstreams), "test")
    servers = [ThreadServer(create_app(config, redis_url)).start() for _ in range(2)]
    headers = {"authorization": f"Bearer {admin_key}"}
    clients = [httpx.Client(base_url=s.url, headers=headers) for s in servers]
    yield clients
    for client, server in zip(clients, servers, strict=True):
        client.close()
        server.stop()


def test_prices_start_from_the_config(admin: httpx.Client) -> None:
    prices = admin.get("/prices").json()["prices"]
    assert prices["gpt"] == {"input_per_1k": 0.001, "output_per_1k": 0.002}
    assert admin.get("/prices/claude").json()["output_per_1k"] == 0.002


def test_put_price_reaches_every_replica(replicas: list[httpx.Client]) -> None:
    first, second = replicas
    put = first.put("/api/ai-gateway/prices/gpt", json={"input_per_1k": 0, "output_per_1k": 1})
    assert put.status_code == 200

    def second_sees_it() -> bool:
        return second.get("/api/ai-gateway/prices/gpt").json()["output_per_1k"] == 1.0

    wait_until(second_sees_it, timeout=5)
    key = second.post("/api/ai-gateway/keys", json={"name": "p"}).json()["key"]
    served = second.post(
        "/v1/chat/completions",
        json={"model": "gpt", "messages": [{"role": "user", "content": "priced"}]},
        headers={"authorization": f"Bearer {key}"},
    )
    assert served.json()["usage"]["completion_tokens"] == 2
    assert float(served.headers["x-gateway-cost"]) == pytest.approx(2 * 1 / 1000)


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        pytest.param("/prices/nope", {"input_per_1k": 1, "output_per_1k": 1}, 404, id="unknown"),
        pytest.param("/prices/gpt", {"input_per_1k": -1, "output_per_1k": 1}, 400, id="negative"),
        pytest.param("/prices/gpt", {"input_per_1k": 1}, 400, id="missing-field"),
        pytest.param("/prices/gpt", {"input_per_1k": "x", "output_per_1k": 1}, 400, id="type"),
    ],
)
def test_put_price_refuses_bad_input(
    admin: httpx.Client, path: str, body: dict[str, Any], status: int
) -> None:
    assert admin.put(path, json=body).status_code == status
