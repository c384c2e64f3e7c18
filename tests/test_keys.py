"""The admin API for keys, and the admin key itself."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from gateway.keys import identify, mint
from tests.servers import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

RECORD_FIELDS = {
    "id",
    "name",
    "allowed_models",
    "rate_per_min",
    "monthly_cap",
    "hard_cap",
    "spend",
    "spend_month",
    "created_at",
    "revoked",
}


def test_mint_has_256_bits_behind_the_prefix() -> None:
    raw = mint()
    assert raw.startswith("sk-gw-")
    assert len(raw.removeprefix("sk-gw-")) * 6 >= 256
    key_id, digest = identify(raw)
    assert digest == hashlib.sha256(raw.encode()).hexdigest()
    assert key_id == digest[:16]


def test_create_returns_raw_key_once_and_stores_only_its_hash(
    admin: httpx.Client, redis_server: RedisServer
) -> None:
    response = admin.post(
        "/keys",
        json={
            "name": "team-a",
            "allowed_models": ["gpt"],
            "rate_per_min": 5,
            "monthly_cap": 12.5,
            "hard_cap": 100,
        },
    )
    assert response.status_code == 201
    created = response.json()
    raw, record = created["key"], created["record"]
    assert set(record) >= RECORD_FIELDS
    assert (record["name"], record["allowed_models"], record["rate_per_min"]) == (
        "team-a",
        ["gpt"],
        5,
    )
    assert (record["monthly_cap"], record["hard_cap"], record["revoked"]) == (12.5, 100, False)

    dump = " ".join(
        str(v) for k in redis_server.client().keys("*") for v in _values(redis_server, k)
    )
    assert raw not in dump
    assert hashlib.sha256(raw.encode()).hexdigest() in dump

    shown = admin.get(f"/keys/{record['id']}").json()
    listed = admin.get("/keys").json()["keys"]
    assert "key" not in shown and all("key" not in r and "hash" not in r for r in listed)
    assert [r["id"] for r in listed] == [record["id"]]


def test_list_pages_through_keys_in_id_order(admin: httpx.Client, mint: Any) -> None:
    ids = sorted(mint()[1] for _ in range(5))
    everything = admin.get("/keys").json()
    assert ([r["id"] for r in everything["keys"]], everything["next"]) == (ids, None)
    pages: list[list[str]] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = admin.get("/keys", params=params).json()
        pages.append([r["id"] for r in page["keys"]])
        if page["next"] is None:
            break
        params["cursor"] = page["next"]
    assert pages == [ids[0:2], ids[2:4], ids[4:]]
    for bad in ("0", "1001", "x", "\u00b2"):
        response = admin.get("/keys", params={"limit": bad})
        assert response.status_code == 400 and "limit" in response.json()["error"]["message"]


def _values(redis_server: RedisServer, name: str) -> list[Any]:
    client = redis_server.client()
    kind = client.type(name)
    if kind == "hash":
        return list(client.hgetall(name).values())
    if kind == "string":
        return [client.get(name)]
    return []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({}, "name", id="missing-name"),
        pytest.param({"name": ""}, "name", id="empty-name"),
        pytest.param({"name": "a", "rate_per_min": -1}, "rate_per_min", id="negative-rate"),
        pytest.param({"name": "a", "rate_per_min": "5"}, "rate_per_min", id="rate-as-string"),
        pytest.param({"name": "a", "monthly_cap": -2}, "monthly_cap", id="negative-cap"),
        pytest.param(
            {"name": "a", "allowed_models": ["nope"]}, "allowed_models[0]", id="unknown-model"
        ),
        pytest.param({"name": "a", "extra": 1}, "extra", id="unknown-field"),
    ],
)
def test_create_refuses_bad_bodies(admin: httpx.Client, body: dict[str, Any], field: str) -> None:
    response = admin.post("/keys", json=body)
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]


def test_show_and_revoke_unknown_key_is_404(admin: httpx.Client) -> None:
    assert admin.get("/keys/0123456789abcdef").status_code == 404
    assert admin.delete("/keys/0123456789abcdef").status_code == 404


def test_show_reports_spend(admin: httpx.Client, mint: Any, gateway_url: str) -> None:
    key, key_id = mint()
    httpx.post(
        gateway_url + "/v1/chat/completions",
        json={"model": "gpt", "messages": [{"role": "user", "content": "spend"}]},
        headers={"authorization": f"Bearer {key}"},
    )
    record = admin.get(f"/keys/{key_id}").json()
    usage = admin.get("/usage", params={"key": key_id}).json()["records"]
    assert record["spend"] == record["spend_month"] == usage[0]["cost"] > 0


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param("Bearer wrong", id="wrong"),
        pytest.param("Bearer sk-gw-" + "A" * 43, id="gateway-key-shape"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/keys"),
        ("POST", "/keys"),
        ("GET", "/keys/x"),
        ("DELETE", "/keys/x"),
        ("GET", "/prices"),
        ("PUT", "/prices/gpt"),
    ],
)
def test_admin_endpoints_refuse_without_admin_key(
    gateway_url: str, authorization: str | None, method: str, path: str
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    response = httpx.request(
        method, gateway_url + "/api/ai-gateway" + path, headers=headers, json={"name": "x"}
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_gateway_key_is_not_an_admin_key(gateway_url: str, mint: Any) -> None:
    key, _ = mint()
    response = httpx.get(
        gateway_url + "/api/ai-gateway/keys", headers={"authorization": f"Bearer {key}"}
    )
    assert response.status_code == 401


@pytest.mark.parametrize("cap", ["monthly_cap", "hard_cap"])
def test_cap_below_one_nano_usd_is_refused(admin: httpx.Client, cap: str) -> None:
    response = admin.post("/keys", json={"name": "tiny", cap: 5e-10})
    assert response.status_code == 400
    assert cap in response.json()["error"]["message"]
