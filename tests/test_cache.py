"""The response cache, end to end: hits are free, recorded, per key, and replayable as streams."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from gateway import config as config_module
from gateway.app import create_app
from tests.conftest import config_dict
from tests.servers import RedisServer, ThreadServer
from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def chat(url: str, key: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    payload = {"model": "gpt", "messages": [{"role": "user", "content": "cache me"}], **body}
    return httpx.post(
        url + "/v1/chat/completions",
        json=payload,
        headers={"authorization": f"Bearer {key}", **(headers or {})},
        timeout=10,
    )


def usage_of(admin: httpx.Client, key_id: str) -> list[dict[str, Any]]:
    return list(admin.get("/usage", params={"key": key_id}).json()["records"])


def test_cache_second_request_is_a_free_hit(
    gateway_url: str, mint: Any, admin: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    key, key_id = mint()
    first = chat(gateway_url, key)
    second = chat(gateway_url, key)

    assert first.headers["x-gateway-cache"] == "miss"
    assert second.headers["x-gateway-cache"] == "hit"
    assert float(second.headers["x-gateway-cost"]) == 0
    assert second.headers["x-gateway-provider"] == "openai"
    assert second.json()["choices"] == first.json()["choices"]
    assert len(upstreams["openai"].requests) == 1
    newest, oldest = usage_of(admin, key_id)
    assert (newest["cached"], newest["cost"]) == (True, 0)
    assert oldest["cached"] is False
    assert admin.get(f"/keys/{key_id}").json()["spend"] == oldest["cost"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"temperature": 0.7}, id="temperature"),
        pytest.param({"tools": [TOOL]}, id="tools"),
        pytest.param({"max_tokens": 17}, id="max_tokens"),
        pytest.param({"seed": 3}, id="seed"),
        pytest.param({"messages": [{"role": "user", "content": "other"}]}, id="messages"),
    ],
)
def test_cache_changed_field_misses(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream], change: dict[str, Any]
) -> None:
    key, _ = mint()
    chat(gateway_url, key)
    assert chat(gateway_url, key, **change).headers["x-gateway-cache"] == "miss"
    assert len(upstreams["openai"].requests) == 2


def test_cache_transport_fields_do_not_change_the_key(gateway_url: str, mint: Any) -> None:
    key, _ = mint()
    chat(gateway_url, key)
    assert chat(gateway_url, key, user="someone").headers["x-gateway-cache"] == "hit"


def test_cache_is_per_key_by_default(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream]
) -> None:
    (first_key, _), (second_key, _) = mint(), mint()
    chat(gateway_url, first_key)
    assert chat(gateway_url, second_key).headers["x-gateway-cache"] == "miss"
    assert len(upstreams["openai"].requests) == 2


def test_cache_global_scope_shares_entries(
    redis_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> None:
    raw = config_dict(upstreams, cache={"scope": "global", "ttl_seconds": 60})
    server = ThreadServer(create_app(config_module.parse(raw, "test"), redis_url)).start()
    try:
        admin = {"authorization": f"Bearer {admin_key}"}
        keys = [
            httpx.post(server.url + "/api/ai-gateway/keys", json={"name": n}, headers=admin).json()
            for n in ("a", "b")
        ]
        chat(server.url, keys[0]["key"])
        assert chat(server.url, keys[1]["key"]).headers["x-gateway-cache"] == "hit"
    finally:
        server.stop()


def test_an_unreadable_global_cache_key_is_a_miss_and_the_request_settles(
    redis_url: str, redis_server: RedisServer, upstreams: dict[str, Upstream], admin_key: str
) -> None:
    """The global cache is read beside admission; a Redis error there (here the entry's
    key holds a hash) is a miss, not a 500 that drops the admitted reservation."""
    raw = config_dict(upstreams, cache={"scope": "global", "ttl_seconds": 60})
    server = ThreadServer(create_app(config_module.parse(raw, "test"), redis_url)).start()
    client = redis_server.client()
    try:
        admin = {"authorization": f"Bearer {admin_key}"}
        made = httpx.post(server.url + "/api/ai-gateway/keys", json={"name": "a"}, headers=admin)
        key, key_id = made.json()["key"], made.json()["record"]["id"]
        assert chat(server.url, key).headers["x-gateway-cache"] == "miss"
        (entry,) = client.keys("gw:cache:global:*")
        client.delete(entry)
        client.hset(entry, "not", "an entry")
        again = chat(server.url, key)
        assert (again.status_code, again.headers["x-gateway-cache"]) == (200, "miss")
        assert len(upstreams["openai"].requests) == 2
        assert client.hget(f"gw:{{{key_id}}}:spend", "reserved") == "0"
    finally:
        server.stop()


def test_cache_control_no_cache_and_no_store(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream]
) -> None:
    key, _ = mint()
    chat(gateway_url, key, headers={"cache-control": "no-store"})
    assert chat(gateway_url, key).headers["x-gateway-cache"] == "miss"  # nothing was stored
    assert (
        chat(gateway_url, key, headers={"cache-control": "no-cache"}).headers["x-gateway-cache"]
        == "miss"
    )  # stored, but the lookup was skipped
    assert chat(gateway_url, key).headers["x-gateway-cache"] == "hit"
    assert len(upstreams["openai"].requests) == 3


def test_cache_stream_is_stored_assembled_and_replayed(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream]
) -> None:
    key, _ = mint()
    streamed = chat(gateway_url, key, stream=True)
    assert streamed.headers["x-gateway-cache"] == "miss"
    plain = chat(gateway_url, key)
    assert plain.headers["x-gateway-cache"] == "hit"
    assert plain.json()["choices"][0]["message"]["content"] == "echo: cache me"
    replayed = chat(gateway_url, key, stream=True)
    assert replayed.headers["x-gateway-cache"] == "hit"
    assert "echo: cache me" in replayed.text
    assert replayed.text.rstrip().endswith("data: [DONE]")
    assert len(upstreams["openai"].requests) == 1


def test_cache_hit_counts_against_the_rate_limit(gateway_url: str, mint: Any) -> None:
    key, _ = mint(rate_per_min=2)
    assert chat(gateway_url, key).status_code == 200
    assert chat(gateway_url, key).headers["x-gateway-cache"] == "hit"
    assert chat(gateway_url, key).status_code == 429


def test_miss_and_hit_take_two_script_calls_each(
    gateway_url: str, mint: Any, redis_server: RedisServer
) -> None:
    """With the cache beside the key's state (the default), admission reads it and
    settlement writes it: each request is exactly two Redis commands."""
    key, _ = mint()
    warm, _ = mint()
    chat(gateway_url, warm)  # loads the scripts and opens the connections
    chat(gateway_url, warm)
    seen: list[str] = []
    with redis_server.client().monitor() as monitor:

        def watch() -> None:
            for command in monitor.listen():
                if command["client_type"] != "lua":  # commands run by the scripts themselves
                    seen.append(command["command"].split()[0].upper())
                if seen and seen[-1] == "ECHO":
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert chat(gateway_url, key).headers["x-gateway-cache"] == "miss"
        assert chat(gateway_url, key).headers["x-gateway-cache"] == "hit"
        redis_server.client().echo("done")
        watcher.join(timeout=10)
    setup = ("PING", "ECHO", "HELLO", "CLIENT", "SELECT")  # per connection, not per request
    assert [c for c in seen if c not in setup] == ["EVALSHA"] * 4
