"""Routes and fallback against stand-in providers that fail on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway import config as config_module
from gateway.app import create_app
from tests.conftest import config_dict
from tests.servers import RedisServer, ThreadServer, free_port
from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture
def fast_gateway(redis_url: str, upstreams: dict[str, Upstream], admin_key: str) -> Iterator[str]:
    """Short provider timeouts, and a model whose first route is a closed port."""
    raw = config_dict(upstreams)
    raw["providers"]["openai"]["timeout_seconds"] = 0.5
    raw["providers"]["dead"] = {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"}
    raw["models"]["dead-first"] = {
        **{k: raw["models"]["gpt"][k] for k in ("input_per_1k", "output_per_1k")},
        "routes": [
            {"provider": "dead", "model": "x"},
            {"provider": "claude", "model": "claude-up"},
        ],
    }
    server = ThreadServer(create_app(config_module.parse(raw, "test"), redis_url)).start()
    yield server.url
    server.stop()


def post(url: str, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "fallback", "messages": [{"role": "user", "content": "route me"}], **body}
    return httpx.post(
        url + "/v1/chat/completions", json=payload,
        headers={"authorization": f"Bearer {key}"}, timeout=10,
    )  # fmt: skip


def spend_state(redis_server: RedisServer, key_id: str) -> tuple[int, int, int]:
    """(settled nano-USD, reserved nano-USD, usage records) straight from Redis."""
    client = redis_server.client()
    spend = client.hgetall(f"gw:{{{key_id}}}:spend")
    records = client.xlen(f"gw:{{{key_id}}}:usage")
    return int(spend.get("total", 0)), int(spend.get("reserved", 0)), records


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("status:500", id="500"),
        pytest.param("status:503", id="503"),
        pytest.param("status:429", id="429"),
        pytest.param("status:401", id="401"),
        pytest.param("status:403", id="403"),
        pytest.param("malformed", id="unparseable"),
        pytest.param("stall", id="timeout"),
    ],
)
def test_fallback_moves_to_next_route(
    fast_gateway: str, mint: Any, upstreams: dict[str, Upstream], mode: str
) -> None:
    key, _ = mint()
    upstreams["openai"].mode = mode
    upstreams["openai"].stall_seconds = 3
    response = post(fast_gateway, key)
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-provider"] == "claude"
    assert response.json()["choices"][0]["message"]["content"] == "echo: route me"
    assert len(upstreams["openai"].requests) == 1
    assert len(upstreams["claude"].requests) == 1


def test_fallback_on_connection_refused(
    fast_gateway: str, mint: Any, upstreams: dict[str, Upstream]
) -> None:
    key, _ = mint()
    response = post(fast_gateway, key, model="dead-first")
    assert response.status_code == 200
    assert response.headers["x-gateway-provider"] == "claude"


@pytest.mark.parametrize("status", [400, 404, 422])
def test_client_error_is_returned_without_fallback(
    gateway_url: str,
    mint: Any,
    upstreams: dict[str, Upstream],
    redis_server: RedisServer,
    status: int,
) -> None:
    key, key_id = mint()
    upstreams["openai"].mode = f"status:{status}"
    response = post(gateway_url, key)
    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "openai" in response.json()["error"]["message"]
    assert upstreams["claude"].requests == []
    assert spend_state(redis_server, key_id) == (0, 0, 0)


def test_all_routes_failing_is_502_naming_each(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream], redis_server: RedisServer
) -> None:
    key, key_id = mint()
    upstreams["openai"].mode = "status:500"
    upstreams["claude"].mode = "status:529"
    client = openai.OpenAI(base_url=gateway_url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(
            model="fallback", messages=[{"role": "user", "content": "x"}]
        )
    assert raised.value.status_code == 502
    message = raised.value.body["message"]
    assert "openai: HTTP 500" in message and "claude: HTTP 529" in message
    assert spend_state(redis_server, key_id) == (0, 0, 0)


def test_stream_falls_back_before_first_byte(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream]
) -> None:
    key, _ = mint()
    upstreams["openai"].mode = "status:500"
    client = openai.OpenAI(base_url=gateway_url + "/v1", api_key=key, max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="fallback", messages=[{"role": "user", "content": "stream route"}], stream=True
    ) as response:
        assert response.headers["x-gateway-provider"] == "claude"
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    assert text == "echo: stream route"


def test_stream_cut_midway_is_settled_without_fallback(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream], redis_server: RedisServer
) -> None:
    key, key_id = mint()
    upstreams["openai"].mode = "cut"
    upstreams["openai"].reply = " ".join(f"w{i}" for i in range(40))
    client = openai.OpenAI(base_url=gateway_url + "/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model="fallback", messages=[{"role": "user", "content": "cut"}], stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert upstreams["claude"].requests == []
    settled, reserved, records = spend_state(redis_server, key_id)
    assert (reserved, records) == (0, 1)
    assert settled > 0


@pytest.fixture
def short_deadline_gateway(
    redis_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> Iterator[str]:
    raw = config_dict(upstreams, limits={"request_timeout_seconds": 1})
    server = ThreadServer(create_app(config_module.parse(raw, "test"), redis_url)).start()
    yield server.url
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_request_deadline_is_504_and_releases(
    short_deadline_gateway: str,
    mint: Any,
    upstreams: dict[str, Upstream],
    redis_server: RedisServer,
    stream: bool,
) -> None:
    """The deadline runs from admission, first chunk included, so no lease can run out first."""
    key, key_id = mint()
    upstreams["openai"].delay_seconds = 3
    response = post(short_deadline_gateway, key, model="gpt", stream=stream)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert spend_state(redis_server, key_id) == (0, 0, 0)
