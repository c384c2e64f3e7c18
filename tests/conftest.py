"""Fixtures: one throwaway Redis per session (flushed per test), stand-in providers,
and the gateway served over real HTTP by uvicorn."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway import config as config_module
from gateway.app import create_app
from tests.servers import RedisServer, ThreadServer
from tests.upstreams import Upstream, anthropic_upstream, openai_upstream

UPSTREAM_KEYS = {"OPENAI_STANDIN_KEY": "sk-upstream-openai", "ANTHROPIC_STANDIN_KEY": "sk-ant-up"}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def openai_up() -> Iterator[Upstream]:
    upstream = openai_upstream()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def anthropic_up() -> Iterator[Upstream]:
    upstream = anthropic_upstream()
    yield upstream
    upstream.stop()


@pytest.fixture
def upstreams(openai_up: Upstream, anthropic_up: Upstream) -> dict[str, Upstream]:
    openai_up.reset()
    anthropic_up.reset()
    return {"openai": openai_up, "claude": anthropic_up}


def config_dict(upstreams: dict[str, Upstream], **overrides: Any) -> dict[str, Any]:
    """Two real stand-in providers and models routed over them in several ways."""
    price = {"input_per_1k": 0.001, "output_per_1k": 0.002, "max_output_tokens": 256}
    raw: dict[str, Any] = {
        "providers": {
            "openai": {
                "type": "openai", "base_url": upstreams["openai"].base_url,
                "api_key_env": "OPENAI_STANDIN_KEY", "timeout_seconds": 5,
            },
            "claude": {
                "type": "anthropic", "base_url": upstreams["claude"].base_url,
                "api_key_env": "ANTHROPIC_STANDIN_KEY", "timeout_seconds": 5,
            },
            "mock": {"type": "mock"},
        },
        "models": {
            "gpt": {**price, "routes": [{"provider": "openai", "model": "gpt-up"}]},
            "claude": {**price, "routes": [{"provider": "claude", "model": "claude-up"}]},
            "fallback": {**price, "routes": [
                {"provider": "openai", "model": "gpt-up"},
                {"provider": "claude", "model": "claude-up"},
            ]},
            "mock-echo": {**price, "routes": [{"provider": "mock", "model": "mock-echo"}]},
        },
    }  # fmt: skip
    raw.update(overrides)
    return raw


@pytest.fixture
def admin_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = "sk-admin-" + secrets.token_hex(16)
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", key)
    for name, value in UPSTREAM_KEYS.items():
        monkeypatch.setenv(name, value)
    return key


@pytest.fixture
def gateway_url(redis_url: str, upstreams: dict[str, Upstream], admin_key: str) -> Iterator[str]:
    config = config_module.parse(config_dict(upstreams), "test config")
    server = ThreadServer(create_app(config, redis_url)).start()
    yield server.url
    server.stop()


@pytest.fixture
def admin(gateway_url: str, admin_key: str) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=gateway_url + "/api/ai-gateway", headers=headers) as client:
        yield client


@pytest.fixture
def mint(admin: httpx.Client) -> Any:
    """mint(**limits) -> (raw key, key id)."""

    def create(**spec: Any) -> tuple[str, str]:
        response = admin.post("/keys", json={"name": "test", **spec})
        assert response.status_code == 201, response.text
        body = response.json()
        return body["key"], body["record"]["id"]

    return create


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def chat_each(gateway_url: str, key: str, texts: list[str], model: str = "gpt") -> None:
    """One plain chat completion per text, one after another."""
    for text in texts:
        response = httpx.post(
            gateway_url + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": text}]},
            headers={"authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200, response.text
