"""Bad input: each gets its 4xx with the OpenAI error body, no usage record and no spend."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.servers import RedisServer
from tests.test_routing import spend_state
from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

GOOD = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}


def send(url: str, key: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        content=content,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json", **headers},
        timeout=10,
    )


def dumps(body: dict[str, Any]) -> bytes:
    return httpx.Request("POST", "/", json=body).content


BAD_BODIES = [
    pytest.param(b"{not json", "not valid JSON", id="malformed-json"),
    pytest.param(b"", "empty", id="empty-body"),
    pytest.param(b"[1, 2]", "JSON object", id="not-an-object"),
    pytest.param(b'{"model": "gpt", "messages": [], "temperature": NaN}', "JSON", id="nan"),
    pytest.param(b'{"model": "gpt", "temperature": Infinity}', "JSON", id="infinity"),
    pytest.param(
        b'{"model": "gpt", "messages": [{"role": "user", "content": "\xff"}]}',
        "JSON",
        id="invalid-utf8",
    ),
    pytest.param(dumps({"messages": GOOD["messages"]}), "model", id="missing-model"),
    pytest.param(dumps({"model": "gpt", "messages": "hi"}), "messages", id="messages-not-list"),
    pytest.param(dumps({"model": "gpt", "messages": []}), "messages", id="messages-empty"),
    pytest.param(dumps({**GOOD, "max_tokens": -1}), "max_tokens", id="negative-max-tokens"),
    pytest.param(dumps({**GOOD, "max_tokens": 100_000}), "max_tokens", id="max-tokens-over-model"),
    pytest.param(dumps({**GOOD, "temperature": 3}), "temperature", id="temperature-range"),
    pytest.param(dumps({**GOOD, "temperature": "hot"}), "temperature", id="temperature-type"),
    pytest.param(dumps({**GOOD, "stream": "yes"}), "stream", id="stream-type"),
    pytest.param(
        dumps({"model": "gpt", "messages": [{"role": "robot", "content": "x"}]}),
        "messages[0]",
        id="unknown-role",
    ),
    pytest.param(
        dumps({"model": "gpt", "messages": [{"role": "user", "content": 5}]}),
        "messages[0].content",
        id="content-type",
    ),
    pytest.param(
        dumps({**GOOD, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}),
        "tools[0].function.name",
        id="tool-name",
    ),
    pytest.param(b"[" * 5000 + b"]" * 5000, "JSON", id="deep-nesting"),
]


@pytest.mark.parametrize(("content", "names"), BAD_BODIES)
def test_bad_body_is_400_naming_the_problem(
    gateway_url: str,
    mint: Any,
    redis_server: RedisServer,
    upstreams: dict[str, Upstream],
    content: bytes,
    names: str,
) -> None:
    key, key_id = mint()
    response = send(gateway_url, key, content)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert names in error["message"]
    assert error["type"] == "invalid_request_error"
    assert spend_state(redis_server, key_id) == (0, 0, 0)
    assert upstreams["openai"].requests == []


def test_body_over_limit_is_413(gateway_url: str, mint: Any, redis_server: RedisServer) -> None:
    key, key_id = mint()
    big = dumps({**GOOD, "messages": [{"role": "user", "content": "x" * (1024 * 1024)}]})
    response = send(gateway_url, key, big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert spend_state(redis_server, key_id) == (0, 0, 0)


def test_body_over_limit_without_content_length_is_413(gateway_url: str, mint: Any) -> None:
    key, _ = mint()

    def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 32_768

    response = httpx.post(
        gateway_url + "/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {key}"},
    )
    assert response.status_code == 413


def test_unknown_model_is_404(gateway_url: str, mint: Any, redis_server: RedisServer) -> None:
    key, key_id = mint()
    response = send(gateway_url, key, dumps({**GOOD, "model": "nope"}))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert spend_state(redis_server, key_id) == (0, 0, 0)


def test_model_not_allowed_is_403(gateway_url: str, mint: Any, redis_server: RedisServer) -> None:
    key, key_id = mint(allowed_models=["claude"])
    response = send(gateway_url, key, dumps(GOOD))
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert spend_state(redis_server, key_id) == (0, 0, 0)


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param("Basic abc", id="wrong-scheme"),
        pytest.param("Bearer sk-gw-unknown", id="malformed-key"),
        pytest.param("Bearer sk-gw-" + "A" * 43, id="unknown-key"),
    ],
)
def test_bad_key_is_401(gateway_url: str, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}
    response = httpx.post(gateway_url + "/v1/chat/completions", json=GOOD, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_revoked_key_is_401_at_next_request(
    gateway_url: str, mint: Any, admin: httpx.Client, redis_server: RedisServer
) -> None:
    key, key_id = mint()
    assert send(gateway_url, key, dumps(GOOD)).status_code == 200
    before = spend_state(redis_server, key_id)
    assert admin.delete(f"/keys/{key_id}").status_code == 200
    response = send(gateway_url, key, dumps({**GOOD, "seed": 1}))
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert spend_state(redis_server, key_id) == before


SECRET_TEMPLATE = "Customer tier: {{internal_tier}}; account {{account_number}}"
STRANGERS_BODIES = [
    pytest.param(b"{not json", id="malformed-json"),
    pytest.param(dumps({"messages": GOOD["messages"]}), id="missing-model"),
    pytest.param(dumps({**GOOD, "model": "no-such-model"}), id="unknown-model"),
    pytest.param(dumps({**GOOD, "max_tokens": -1}), id="negative-max-tokens"),
    pytest.param(dumps({**GOOD, "prompt": {"name": "unpushed"}}), id="unknown-prompt"),
    pytest.param(dumps({**GOOD, "prompt": {"name": "internal"}}), id="prompt-missing-vars"),
    pytest.param(
        dumps({**GOOD, "prompt": {"name": "internal", "version": 9}}), id="unknown-version"
    ),
]


@pytest.mark.parametrize("stranger", ["unknown", "revoked"])
@pytest.mark.parametrize("content", STRANGERS_BODIES)
def test_a_bad_key_hears_401_before_anything_about_its_body(
    gateway_url: str, mint: Any, admin: httpx.Client, stranger: str, content: bytes
) -> None:
    assert admin.post("/prompts/internal", json={"template": SECRET_TEMPLATE}).status_code == 201
    key, key_id = mint()
    if stranger == "revoked":
        assert admin.delete(f"/keys/{key_id}").status_code == 200
    else:
        key = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    response = send(gateway_url, key, content)
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    for told in ("internal_tier", "account_number", "unpushed", "internal", "no-such-model"):
        assert told not in response.text


def test_a_good_key_still_hears_what_is_wrong_with_its_body(
    gateway_url: str, mint: Any, admin: httpx.Client
) -> None:
    assert admin.post("/prompts/internal", json={"template": SECRET_TEMPLATE}).status_code == 201
    key, _ = mint()
    missing = send(gateway_url, key, dumps({**GOOD, "prompt": {"name": "internal"}}))
    assert missing.status_code == 400
    assert "internal_tier" in missing.text and "account_number" in missing.text
    assert send(gateway_url, key, b"{not json").status_code == 400
    assert send(gateway_url, key, dumps({**GOOD, "model": "no-such-model"})).status_code == 404


def test_hard_cap_is_402(gateway_url: str, mint: Any, redis_server: RedisServer) -> None:
    key, key_id = mint(hard_cap=0.000001)
    response = send(gateway_url, key, dumps(GOOD))
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "spend_cap_reached"
    assert "lifetime" in response.json()["error"]["message"]
    assert spend_state(redis_server, key_id) == (0, 0, 0)


def test_unknown_path_and_method_use_the_error_body(gateway_url: str) -> None:
    missing = httpx.get(gateway_url + "/v1/nothing")
    wrong_method = httpx.get(gateway_url + "/v1/chat/completions")
    assert missing.status_code == 404 and "error" in missing.json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_nesting_past_the_limit_is_400_not_500(gateway_url: str, mint: Any) -> None:
    key, _ = mint()
    deep = b'{"model": "gpt", "messages": [{"role": "user", "content": "x"}], "metadata": '
    deep += b'{"a": ' * 300 + b"1" + b"}" * 300 + b"}"
    response = send(gateway_url, key, deep)
    assert response.status_code == 400
    assert "nested" in response.json()["error"]["message"]


def test_slow_body_is_408(gateway_url: str, mint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from gateway.api import http as http_module

    monkeypatch.setattr(http_module, "BODY_SECONDS", 0.5)
    key, _ = mint()
    host, port = gateway_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            + f"Authorization: Bearer {key}\r\n\r\n".encode()
            + b'{"model": '
        )
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408")
    assert "request_timeout" in answer


def test_trailing_slash_is_not_redirected(gateway_url: str) -> None:
    response = httpx.get(gateway_url + "/v1/models/", headers={"host": "evil.example"})
    assert response.status_code == 404
    assert "location" not in response.headers
