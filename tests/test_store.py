"""The store seam: TLS, readiness, error mapping and the eviction-policy warning."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from gateway import config as config_module
from gateway.app import create_app
from gateway.store import Store
from tests.servers import RedisServer, ThreadServer, free_port, redis_binary, wait_until

pytestmark = [pytest.mark.redis]


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A TLS-only Redis with a certificate from a throwaway CA; yields a rediss:// URL."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    port = free_port()
    process = subprocess.Popen(
        [
            redis_binary(),
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(tmp_path / "cert.pem"),
            "--tls-key-file",
            str(tmp_path / "key.pem"),
            "--tls-ca-cert-file",
            str(tmp_path / "ca.pem"),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}"
    try:
        wait_until(lambda: process.poll() is not None or _tls_answers(url), timeout=10)
        if process.poll() is not None:
            pytest.skip(f"{redis_binary()} was built without TLS")
        yield url
    finally:
        process.kill()
        process.wait()


def _tls_answers(url: str) -> bool:
    import redis

    return bool(redis.Redis.from_url(url).ping())


async def test_store_over_tls_runs_the_scripts(tls_redis: str) -> None:
    store = Store(tls_redis)
    try:
        assert await store.ready()
        assert len(await store.month()) == 7
    finally:
        await store.close()


def test_gateway_over_tls_end_to_end(tls_redis: str, admin_key: str) -> None:
    server = ThreadServer(create_app(config_module.load(None), tls_redis)).start()
    try:
        headers = {"authorization": f"Bearer {admin_key}"}
        key = httpx.post(
            server.url + "/api/ai-gateway/keys", json={"name": "tls"}, headers=headers
        ).json()["key"]
        done = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "mock-echo", "messages": [{"role": "user", "content": "over tls"}]},
            headers={"authorization": f"Bearer {key}"},
        )
        assert done.json()["choices"][0]["message"]["content"] == "echo: over tls"
    finally:
        server.stop()


def test_readyz_follows_the_store(admin_key: str) -> None:
    redis_server = RedisServer()
    server = ThreadServer(create_app(config_module.load(None), redis_server.url)).start()
    try:
        assert httpx.get(server.url + "/healthz").status_code == 200
        down = httpx.get(server.url + "/readyz")
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "store_unavailable"
        key = "sk-gw-" + "A" * 43
        refused = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "mock-echo", "messages": [{"role": "user", "content": "x"}]},
            headers={"authorization": f"Bearer {key}"},
        )
        assert refused.status_code == 503

        redis_server.start()
        wait_until(lambda: httpx.get(server.url + "/readyz").status_code == 200, timeout=10)
    finally:
        server.stop()
        redis_server.stop()


async def test_warns_when_the_store_may_evict(caplog: pytest.LogCaptureFixture) -> None:
    redis_server = RedisServer().start()
    redis_server.client().config_set("maxmemory-policy", "allkeys-lru")
    store = Store(redis_server.url)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.store"):
            await store.warn_if_evicting()
        assert "allkeys-lru" in caplog.text and "noeviction" in caplog.text
    finally:
        await store.close()
        redis_server.stop()
