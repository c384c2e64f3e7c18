"""Prompt templates: syntax, the admin API, atomic numbering across replicas, completions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway import config as config_module
from gateway.app import create_app
from gateway.errors import BadRequest
from gateway.prompts import Template
from tests.conftest import config_dict
from tests.servers import RedisServer, ThreadServer
from tests.test_routing import spend_state
from tests.upstreams import Upstream

pytestmark = [pytest.mark.redis]


@pytest.mark.parametrize(
    ("text", "values", "rendered"),
    [
        pytest.param("Hi {{name}}!", {"name": "Ada"}, "Hi Ada!", id="tight"),
        pytest.param("Hi {{ name }}!", {"name": "Ada"}, "Hi Ada!", id="spaced"),
        pytest.param("{{a}}{{b}}{{a}}", {"a": 1, "b": True}, "1true1", id="repeats-and-scalars"),
        pytest.param("literal \\{{ braces }}", {}, "literal {{ braces }}", id="escaped"),
        pytest.param("no variables", {"extra": "ignored"}, "no variables", id="extra-ignored"),
        pytest.param("{{x}}", {"x": "{{y}}"}, "{{y}}", id="values-not-re-expanded"),
    ],
)
def test_template_renders(text: str, values: dict[str, Any], rendered: str) -> None:
    assert Template.parse(text).render(values) == rendered


def test_template_names_every_missing_variable() -> None:
    with pytest.raises(BadRequest, match="missing first, second"):
        Template.parse("{{first}} and {{ second }} and {{third}}").render({"third": 3})


@pytest.mark.parametrize("text", ["open {{ forever", "{{ 1bad }}", "{{}}", "{{a b}}"])
def test_template_refuses_stray_braces(text: str) -> None:
    with pytest.raises(BadRequest, match="opens no variable"):
        Template.parse(text)


def test_template_refuses_structured_values() -> None:
    with pytest.raises(BadRequest, match=r"variables\.x"):
        Template.parse("{{x}}").render({"x": {"nested": 1}})


def test_versions_and_activation(admin: httpx.Client) -> None:
    first = admin.post("/prompts/greet", json={"template": "Hello {{who}}"})
    second = admin.post("/prompts/greet", json={"template": "Bonjour {{ who }}"})
    assert first.status_code == second.status_code == 201
    assert (first.json()["version"], first.json()["active"]) == (1, 1)
    assert (second.json()["version"], second.json()["active"]) == (2, 1)

    render = {"variables": {"who": "Ada"}}
    assert admin.post("/prompts/greet/render", json=render).json() == {
        "text": "Hello Ada",
        "version": 1,
    }
    assert admin.post("/prompts/greet/activate", json={"version": 2}).status_code == 200
    assert admin.post("/prompts/greet/render", json=render).json()["text"] == "Bonjour Ada"
    pinned = admin.post("/prompts/greet/render", json={**render, "version": 1})
    assert pinned.json()["text"] == "Hello Ada"

    shown = admin.get("/prompts/greet").json()
    assert shown["active"] == 2
    assert [v["version"] for v in shown["versions"]] == [1, 2]
    assert shown["versions"][0]["template"] == "Hello {{who}}"
    assert admin.get("/prompts").json()["prompts"] == [{"name": "greet", "active": 2, "latest": 2}]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "named"),
    [
        pytest.param("GET", "/prompts/ghost", None, 404, "ghost", id="unknown-show"),
        pytest.param("POST", "/prompts/ghost/render", {}, 404, "ghost", id="unknown-render"),
        pytest.param("POST", "/prompts/t/activate", {"version": 9}, 404, "version 9",
                     id="unknown-version"),
        pytest.param("POST", "/prompts/t/render", {"version": 9}, 404, "version 9",
                     id="unknown-version-render"),
        pytest.param("POST", "/prompts/t/render", {}, 400, "missing who", id="missing-variable"),
        pytest.param("POST", "/prompts/t", {"template": "{{ oops"}, 400, "template",
                     id="stray-braces"),
        pytest.param("POST", "/prompts/t", {"template": "x" * 70_000}, 400, "limit",
                     id="template-too-big"),
        pytest.param("POST", "/prompts/t/render", {"variables": {"who": "x" * 70_000}}, 400,
                     "limit", id="variables-too-big"),
        pytest.param("POST", "/prompts/bad%20name", {"template": "x"}, 400, "name",
                     id="bad-name"),
        pytest.param("POST", "/prompts/t", {"template": 5}, 400, "template", id="template-type"),
        pytest.param("POST", "/prompts/t/activate", {"version": "2"}, 400, "version",
                     id="version-type"),
    ],
)  # fmt: skip
def test_prompt_errors(
    admin: httpx.Client, method: str, path: str, body: Any, status: int, named: str
) -> None:
    admin.post("/prompts/t", json={"template": "Hi {{who}}"})
    response = admin.request(method, path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert named in error["message"]
    if status == 404:
        code = "version_not_found" if "version" in named else "prompt_not_found"
        assert (error["type"], error["code"]) == ("not_found_error", code)
    else:
        assert error["type"] == "invalid_request_error"


@pytest.fixture
def two_replicas(
    redis_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> Iterator[list[str]]:
    config = config_module.parse(config_dict(upstreams), "test")
    servers = [ThreadServer(create_app(config, redis_url)).start() for _ in range(2)]
    yield [s.url for s in servers]
    for server in servers:
        server.stop()


async def test_concurrent_pushes_get_distinct_gap_free_versions(
    two_replicas: list[str], admin_key: str
) -> None:
    headers = {"authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        responses = await asyncio.gather(
            *(
                http.post(
                    f"{two_replicas[i % 2]}/api/ai-gateway/prompts/shared",
                    json={"template": f"text {i}"},
                )
                for i in range(60)
            )
        )
    versions = sorted(r.json()["version"] for r in responses)
    assert versions == list(range(1, 61))
    shown = httpx.get(f"{two_replicas[0]}/api/ai-gateway/prompts/shared", headers=headers).json()
    texts = {v["template"] for v in shown["versions"]}
    assert texts == {f"text {i}" for i in range(60)}


def test_activation_is_seen_by_every_replica_at_once(
    two_replicas: list[str], admin_key: str
) -> None:
    first, second = (
        httpx.Client(
            base_url=url + "/api/ai-gateway", headers={"authorization": f"Bearer {admin_key}"}
        )
        for url in two_replicas
    )
    first.post("/prompts/p", json={"template": "one"})
    first.post("/prompts/p", json={"template": "two"})
    assert second.post("/prompts/p/render", json={}).json()["text"] == "one"
    first.post("/prompts/p/activate", json={"version": 2})
    assert second.post("/prompts/p/render", json={}).json()["text"] == "two"
    first.post("/prompts/p/activate", json={"version": 1})
    assert second.post("/prompts/p/render", json={}).json()["text"] == "one"


def _chat(
    url: str, key: str, prompt: dict[str, Any], path: str = "/v1/chat/completions"
) -> httpx.Response:
    body = {"model": "gpt", "messages": [{"role": "user", "content": "question"}], "prompt": prompt}
    return httpx.post(url + path, json=body, headers={"authorization": f"Bearer {key}"})


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/ai-gateway/complete"])
def test_completion_renders_prompt_first(
    gateway_url: str,
    admin: httpx.Client,
    mint: Any,
    upstreams: dict[str, Upstream],
    path: str,
) -> None:
    admin.post("/prompts/persona", json={"template": "You are {{ role }}."})
    key, key_id = mint()
    response = _chat(gateway_url, key, {"name": "persona", "variables": {"role": "terse"}}, path)
    assert response.status_code == 200, response.text
    sent = upstreams["openai"].requests[-1].body["messages"]
    assert sent[0] == {"role": "system", "content": "You are terse."}
    assert sent[1] == {"role": "user", "content": "question"}
    assert "prompt" not in upstreams["openai"].requests[-1].body
    record = admin.get("/usage", params={"key": key_id}).json()["records"][0]
    assert (record["prompt"], record["prompt_version"]) == ("persona", 1)


def test_prompt_role_and_version_are_honoured(
    gateway_url: str, admin: httpx.Client, mint: Any, upstreams: dict[str, Upstream]
) -> None:
    admin.post("/prompts/v", json={"template": "first"})
    admin.post("/prompts/v", json={"template": "second"})
    key, _ = mint()
    _chat(gateway_url, key, {"name": "v", "version": 2, "role": "user"})
    assert upstreams["openai"].requests[-1].body["messages"][0] == {
        "role": "user",
        "content": "second",
    }


def test_rendered_text_is_part_of_the_cache_key(
    gateway_url: str, admin: httpx.Client, mint: Any
) -> None:
    admin.post("/prompts/c", json={"template": "Answer in {{lang}}"})
    key, _ = mint()
    first = _chat(gateway_url, key, {"name": "c", "variables": {"lang": "French"}})
    same = _chat(gateway_url, key, {"name": "c", "variables": {"lang": "French"}})
    other = _chat(gateway_url, key, {"name": "c", "variables": {"lang": "Dutch"}})
    assert first.headers["x-gateway-cache"] == "miss"
    assert same.headers["x-gateway-cache"] == "hit"
    assert other.headers["x-gateway-cache"] == "miss"


@pytest.mark.parametrize(
    ("prompt", "status"),
    [
        pytest.param({"name": "ghost"}, 404, id="unknown-prompt"),
        pytest.param({"name": "r", "version": 5}, 404, id="unknown-version"),
        pytest.param({"name": "r"}, 400, id="missing-variables"),
        pytest.param({"name": "r", "variables": {"x": "y" * 70_000}}, 400, id="oversized"),
        pytest.param({"name": "r", "variables": "x"}, 400, id="variables-type"),
        pytest.param({"name": "r", "role": "tool"}, 400, id="bad-role"),
        pytest.param({"variables": {}}, 400, id="no-name"),
    ],
)
def test_completion_that_fails_to_render_is_never_charged(
    gateway_url: str,
    admin: httpx.Client,
    mint: Any,
    redis_server: RedisServer,
    upstreams: dict[str, Upstream],
    prompt: dict[str, Any],
    status: int,
) -> None:
    admin.post("/prompts/r", json={"template": "needs {{x}}"})
    key, key_id = mint()
    response = _chat(gateway_url, key, prompt)
    assert response.status_code == status, response.text
    assert "error" in response.json()
    assert spend_state(redis_server, key_id) == (0, 0, 0)
    assert upstreams["openai"].requests == []
