"""Usage records: newest first, paged by cursor, filtered by time, private to their key."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


def complete(url: str, key: str, text: str) -> None:
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "gpt", "messages": [{"role": "user", "content": text}]},
        headers={"authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200


def test_usage_pages_across_keys_newest_first(
    gateway_url: str, mint: Any, admin: httpx.Client
) -> None:
    keys = [mint() for _ in range(3)]
    for i in range(7):
        complete(gateway_url, keys[i % 3][0], f"request {i}")

    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = admin.get("/usage", params=params).json()
        seen += page["records"]
        cursor = page["next"]
        if cursor is None:
            break
    assert len(seen) == 7
    assert len({r["request_id"] for r in seen}) == 7
    assert [r["id"] for r in seen] == sorted((r["id"] for r in seen), key=_order, reverse=True)
    record = seen[0]
    assert set(record) >= {
        "key_id", "model", "provider", "input_tokens", "output_tokens", "cost", "cached", "at",
    }  # fmt: skip


def _order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)


def test_usage_time_filters(gateway_url: str, mint: Any, admin: httpx.Client) -> None:
    key, key_id = mint()
    complete(gateway_url, key, "one")
    at = admin.get("/usage", params={"key": key_id}).json()["records"][0]["at"]
    assert len(admin.get("/usage", params={"since": at}).json()["records"]) == 1
    assert admin.get("/usage", params={"until": "2000-01-01T00:00:00Z"}).json()["records"] == []
    assert admin.get("/usage", params={"since": "4102444800"}).json()["records"] == []


def test_key_reads_only_its_own_usage(gateway_url: str, mint: Any) -> None:
    (mine, mine_id), (theirs, theirs_id) = mint(), mint()
    complete(gateway_url, mine, "mine")
    complete(gateway_url, theirs, "theirs")
    headers = {"authorization": f"Bearer {mine}"}
    own = httpx.get(gateway_url + "/api/ai-gateway/usage", headers=headers).json()["records"]
    assert [r["key_id"] for r in own] == [mine_id]
    other = httpx.get(
        gateway_url + "/api/ai-gateway/usage", params={"key": theirs_id}, headers=headers
    )
    assert other.status_code == 403


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": "0"}, id="limit-zero"),
        pytest.param({"limit": "abc"}, id="limit-type"),
        pytest.param({"since": "yesterday"}, id="since"),
        pytest.param({"cursor": "garbage"}, id="cursor"),
        pytest.param({"since": "inf"}, id="since-infinite"),
        pytest.param({"since": "1e308"}, id="since-huge"),
        pytest.param({"since": "-1"}, id="since-negative"),
        pytest.param({"until": "0001-01-01"}, id="until-year-1"),
        pytest.param({"until": "99999999999999999999"}, id="until-huge"),
        pytest.param({"cursor": "99999999999999999999999-0:ab"}, id="cursor-huge-ms"),
        pytest.param({"cursor": "1-99999999999999999999999:ab"}, id="cursor-huge-seq"),
        pytest.param({"cursor": "\u00b2-0:abc"}, id="cursor-superscript"),
    ],
)
def test_usage_refuses_bad_parameters(admin: httpx.Client, params: dict[str, str]) -> None:
    response = admin.get(
        "/usage", params={k: v.encode().decode("unicode_escape") for k, v in params.items()}
    )
    assert response.status_code == 400
    assert next(iter(params)) in response.json()["error"]["message"]
