"""Security: no one past the admin key, no key into another's usage or cache, no secret in
any log, response, upstream request or Redis value, bounded sizes and slow clients cut."""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
import re
import socket
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway import auth
from gateway.api import http as http_module
from gateway.app import API, ROUTES
from tests.conftest import UPSTREAM_KEYS, config_dict, write_config
from tests.servers import GatewayProcess, RedisServer, wait_until
from tests.test_faults import Answer as Seen
from tests.test_faults import Figures, assert_error_body, audit, publish
from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

FIGURES = Figures()
CHAT: dict[str, Any] = {"model": "gpt", "messages": [{"role": "user", "content": "secret-free"}]}


@pytest.fixture(scope="module", autouse=True)
def _publish_figures() -> Iterator[None]:
    yield
    publish("test_security", FIGURES)


def _sent(response: httpx.Response) -> httpx.Response:
    FIGURES.requests_sent += 1
    return response


def _path(template: str) -> str:
    return (
        template.replace("{key_id}", "0123456789abcdef")
        .replace("{model:path}", "gpt")
        .replace("{name}", "greeting")
    )


ADMIN_ROUTES = [
    pytest.param(method, _path(route.path), id=f"{method} {route.path}")
    for route in ROUTES
    for method in sorted(route.methods or ())
    if method != "HEAD"
    and route.path.startswith(API)
    and not route.path.endswith(("/complete", "/usage", "/usage/totals"))
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_endpoints_refuse_missing_or_wrong_admin_key(
    gateway_url: str, admin_key: str, mint: Any, redis_server: RedisServer, method: str, path: str
) -> None:
    key, _ = mint()
    client = redis_server.client()
    before = _snapshot(client)
    wrong = [
        None,
        "Bearer",
        "Bearer wrong",
        f"Bearer {admin_key[:-1]}",
        f"Bearer {admin_key}x",
        f"Bearer {admin_key.upper()}",
        f"Basic {admin_key}",
        f"{admin_key}",
        f"Bearer {key}",  # a gateway key is not an admin key
    ]
    body = {
        "name": "x",
        "template": "t",
        "version": 1,
        "variables": {},
        "input_per_1k": 0,
        "output_per_1k": 0,
    }
    for credential in wrong:
        headers = {"authorization": credential} if credential is not None else {}
        response = _sent(httpx.request(method, gateway_url + path, json=body, headers=headers))
        assert response.status_code == 401, (credential, response.text)
        assert_error_body(response.json())
        assert admin_key not in response.text and key not in response.text
    assert _snapshot(client) == before, "a refused admin call changed the store"


def _snapshot(client: Any) -> dict[str, Any]:
    return {name: client.type(name) for name in client.scan_iter()}


def test_admin_key_is_compared_in_constant_time() -> None:
    """Timing tests are flaky; the code is read instead: the admin check compares digests
    with hmac.compare_digest and with no == or != on the secret."""
    source = textwrap.dedent(inspect.getsource(auth.AdminAuth.check))
    tree = ast.parse(source)
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "hmac.compare_digest"
    ]
    assert calls, "AdminAuth.check does not use hmac.compare_digest"
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            ops = {type(op) for op in node.ops}
            assert not ops & {ast.Eq, ast.NotEq}, f"a plain comparison: {ast.unparse(node)}"
    # Every admin endpoint goes through that check.
    admin_source = Path(inspect.getsourcefile(auth) or "").parent / "api"
    for module in ("admin.py", "prompts.py"):
        text = (admin_source / module).read_text()
        assert "GATEWAY_ADMIN_KEY" not in text and "compare_digest" not in text


def test_key_reads_only_its_own_usage(
    gateway_url: str, mint: Any, admin: httpx.Client, admin_key: str
) -> None:
    (key_a, id_a), (key_b, id_b) = mint(), mint()
    for key in (key_a, key_b):
        done = _sent(
            httpx.post(
                gateway_url + "/v1/chat/completions",
                json=CHAT,
                headers={"authorization": f"Bearer {key}"},
            )
        )
        assert done.status_code == 200
    usage = gateway_url + f"{API}/usage"
    totals = gateway_url + f"{API}/usage/totals"
    as_a = {"authorization": f"Bearer {key_a}"}

    own = _sent(httpx.get(usage, headers=as_a)).json()["records"]
    assert [r["key_id"] for r in own] == [id_a]
    for url in (usage, totals):
        for params in ({"key": id_b}, {"key": id_b + ","}, {"key": "*"}):
            refused = _sent(httpx.get(url, params=params, headers=as_a))
            assert refused.status_code == 403, (url, params, refused.text)
            assert_error_body(refused.json())
    own_totals = _sent(httpx.get(totals, headers=as_a)).json()["totals"]
    assert {t["key_id"] for t in own_totals} == {id_a}
    both = admin.get("/usage").json()["records"]
    assert {r["key_id"] for r in both} == {id_a, id_b}

    _sent(admin.delete(f"/keys/{id_a}"))
    gone = _sent(httpx.get(usage, headers=as_a))
    assert gone.status_code == 401


@pytest.mark.parametrize("stream", [False, True])
def test_cache_entries_never_reach_another_key(
    gateway_url: str, mint: Any, admin: httpx.Client, upstreams: dict[str, Upstream], stream: bool
) -> None:
    (key_a, id_a), (key_b, id_b) = mint(), mint()
    body = {**CHAT, "stream": stream}

    def ask(key: str) -> httpx.Response:
        return _sent(
            httpx.post(
                gateway_url + "/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}"},
            )
        )

    first_a, second_a, first_b = ask(key_a), ask(key_a), ask(key_b)
    assert [r.status_code for r in (first_a, second_a, first_b)] == [200, 200, 200]
    caching = [r.headers["x-gateway-cache"] for r in (first_a, second_a, first_b)]
    assert caching == ["miss", "hit", "miss"]
    assert len(upstreams["openai"].requests) == 2

    def records(key_id: str) -> list[dict[str, Any]]:
        return list(admin.get("/usage", params={"key": key_id}).json()["records"])

    # A stream is settled just after its last byte: wait for the records.
    wait_until(lambda: len(records(id_a)) == 2 and len(records(id_b)) == 1, timeout=5)
    assert [(r["cached"], r["cost"] > 0) for r in records(id_b)] == [(False, True)]


# --- no secret anywhere -------------------------------------------------------------------


@pytest.fixture
def logged_gateway(
    tmp_path: Path, redis_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> Iterator[GatewayProcess]:
    """`gateway serve` at DEBUG level, its log kept; stopped by the test to read it."""
    config = write_config(tmp_path / "gateway.yaml", config_dict(upstreams))
    env = {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_ADMIN_KEY": admin_key,
        "GATEWAY_LOG_LEVEL": "DEBUG",
        "GATEWAY_DATA_DIR": str(tmp_path / "data"),
        **UPSTREAM_KEYS,
    }
    gateway = GatewayProcess(config, env, workers=1).start()
    yield gateway
    if gateway.process is not None and gateway.process.poll() is None:
        gateway.stop()


class Recorder:
    """Every response of a full run, kept whole (status line, headers and body)."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=15)
        self.texts: list[str] = []
        self.minted: list[str] = []  # mint responses: the one place a raw key may appear
        self.answers: list[Seen] = []

    def __call__(self, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
        request_id = "sec-" + uuid.uuid4().hex
        headers = {
            "authorization": f"Bearer {key}",
            "x-request-id": request_id,
            **kwargs.pop("headers", {}),
        }
        response = _sent(self.client.request(method, path, headers=headers, **kwargs))
        text = f"{response.status_code}\n{response.headers}\n{response.text}"
        is_mint = method == "POST" and path == f"{API}/keys" and response.status_code == 201
        (self.minted if is_mint else self.texts).append(text)
        if path in ("/v1/chat/completions", f"{API}/complete"):
            served = response.status_code == 200
            FIGURES.requests_served += served
            FIGURES.requests_refused += not served
            self.answers.append(
                Seen(
                    request_id,
                    response.status_code,
                    None,
                    {},
                    0,
                    0,
                    0,
                    "served" if served else "refused",
                )
            )
        return response


def _full_run(run: Recorder, admin_key: str, upstreams: dict[str, Upstream]) -> list[str]:
    """Mint, complete (plain, streamed, cached, both providers, native), prompts, usage and
    a few errors; returns the raw keys it made and the near misses it tried."""
    made = [run("POST", f"{API}/keys", admin_key, json={"name": n}).json() for n in "ab"]
    key, other = made[0]["key"], made[1]["key"]
    run("GET", f"{API}/keys", admin_key)
    run("GET", f"{API}/keys/{made[0]['record']['id']}", admin_key)
    run("GET", "/v1/models", key)
    for model in ("gpt", "claude"):
        for stream in (False, True, False):  # the third is a cache hit
            body = {**CHAT, "model": model, "stream": stream}
            assert run("POST", "/v1/chat/completions", key, json=body).status_code == 200
    native = {"model": "fallback", "messages": [{"role": "user", "content": "native"}]}
    assert run("POST", f"{API}/complete", other, json=native).status_code == 200
    run("POST", f"{API}/prompts/greeting", admin_key, json={"template": "Hi {{who}}."})
    run("POST", f"{API}/prompts/greeting/render", admin_key, json={"variables": {"who": "x"}})
    prompted = {**CHAT, "prompt": {"name": "greeting", "variables": {"who": "Ann"}}}
    assert run("POST", "/v1/chat/completions", key, json=prompted).status_code == 200
    run("GET", f"{API}/usage", key)
    run("GET", f"{API}/usage", admin_key)
    run("GET", f"{API}/usage/totals", admin_key)

    near_misses = [key[:-1] + ("A" if key[-1] != "A" else "B"), admin_key + "0"]
    for wrong in near_misses:
        assert run("POST", "/v1/chat/completions", wrong, json=CHAT).status_code == 401
        assert run("GET", f"{API}/keys", wrong).status_code == 401
    assert run("POST", "/v1/chat/completions", key, json={"model": "gpt"}).status_code == 400
    assert run("POST", "/v1/chat/completions", key, json={**CHAT, "model": "no"}).status_code == 404
    upstreams["openai"].mode = "status:401"
    assert (
        run("POST", "/v1/chat/completions", key, json={**CHAT, "model": "gpt", "n": 2}).status_code
        == 502
    )
    upstreams["openai"].mode = "status:500"
    assert (
        run(
            "POST",
            "/v1/chat/completions",
            key,
            json={**CHAT, "model": "fallback", "stream": True, "seed": 7},
        ).status_code
        == 200
    )
    upstreams["openai"].mode = "ok"
    run("DELETE", f"{API}/keys/{made[1]['record']['id']}", admin_key)
    assert run("POST", f"{API}/complete", other, json=native).status_code == 401
    return [key, other, *near_misses]


def _store_text(url: str) -> str:
    """Every key name and value in Redis, as the repr of its bytes (cache entries are
    msgpack; a secret is ASCII and shows as itself in a repr)."""
    client = redis.Redis.from_url(url)
    read: dict[bytes, Any] = {
        b"string": client.get,
        b"hash": client.hgetall,
        b"set": client.smembers,
        b"zset": lambda name: client.zrange(name, 0, -1),
        b"stream": client.xrange,
        b"list": lambda name: client.lrange(name, 0, -1),
    }
    parts = []
    for name in client.scan_iter():
        kind = client.type(name)
        parts.append(f"{name!r} {read[kind](name) if kind in read else kind!r}")
    client.close()
    return "\n".join(parts)


def test_no_secret_in_logs_responses_upstream_requests_or_the_store(
    logged_gateway: GatewayProcess,
    admin_key: str,
    upstreams: dict[str, Upstream],
    redis_server: RedisServer,
) -> None:
    run = Recorder(logged_gateway.url)
    try:
        keys = _full_run(run, admin_key, upstreams)
    finally:
        run.client.close()
        log = logged_gateway.stop()
    assert "request_id=sec-" in log or '"request_id": "sec-' in log, "nothing was logged"
    secrets = [*keys, *(k[len("sk-gw-") :] for k in keys[:2]), admin_key, *UPSTREAM_KEYS.values()]
    upstream_requests = [
        f"{r.path} {r.headers} {json.dumps(r.body)}" for u in upstreams.values() for r in u.requests
    ]
    places = {
        "the gateway's log": log,
        "the responses": "\n".join(run.texts),
        "the store": _store_text(redis_server.url),
    }
    for secret in secrets:
        for where, text in places.items():
            assert secret not in text, f"a secret ({secret[:10]}...) in {where}"
    for secret in [*keys, admin_key]:
        assert not any(secret in r for r in upstream_requests), "a gateway secret went upstream"
    # Each provider gets its own key, and only in its credential header.
    openai_key, anthropic_key = (
        UPSTREAM_KEYS["OPENAI_STANDIN_KEY"],
        UPSTREAM_KEYS["ANTHROPIC_STANDIN_KEY"],
    )
    for recorded in upstreams["openai"].requests:
        assert recorded.headers.get("authorization") == f"Bearer {openai_key}"
        assert anthropic_key not in str(recorded)
    for recorded in upstreams["claude"].requests:
        assert recorded.headers.get("x-api-key") == anthropic_key
        assert openai_key not in str(recorded)
    assert all(key in "\n".join(run.minted) for key in keys[:2])  # shown once, at minting
    assert audit(redis_server.client(), run.answers, FIGURES) == []


# --- sizes and slow clients ---------------------------------------------------------------


def _raw_request(
    url: str, head: bytes, body_parts: list[bytes], pause: float, read_timeout: float
) -> tuple[int, bytes, float]:
    """Send `head`, then each body part `pause` s apart; (status, answer, seconds)."""
    port = int(url.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            time.sleep(pause)
            with contextlib.suppress(OSError):
                sock.sendall(part)
        answer = _read_answer(sock)
    FIGURES.requests_sent += 1
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer, time.monotonic() - started


def _read_answer(sock: socket.socket) -> bytes:
    """One HTTP response, read up to its end (the connection may stay open after it)."""
    answer = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
            head, found, body = answer.partition(b"\r\n\r\n")
            if not found:
                continue
            fields = dict(
                line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:] if b":" in line
            )
            if b"content-length" in fields and len(body) >= int(fields[b"content-length"]):
                break
            if fields.get(b"transfer-encoding", b"").strip() == b"chunked" and body.endswith(
                b"0\r\n\r\n"
            ):
                break
    return answer


def _head(path: str, key: str, length: int | None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        "Connection: close",
    ]
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize(
    ("path", "who"),
    [
        ("/v1/chat/completions", "key"),
        (f"{API}/complete", "key"),
        (f"{API}/keys", "admin"),
        (f"{API}/prompts/slow", "admin"),
    ],
)
def test_body_that_never_completes_is_408(
    gateway_url: str,
    mint: Any,
    admin_key: str,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    who: str,
) -> None:
    monkeypatch.setattr(http_module, "BODY_SECONDS", 1)
    key, key_id = mint()
    credential = key if who == "key" else admin_key
    # Declares 200 bytes, sends 20, then one byte every 0.3 s: never done, never idle.
    status, answer, seconds = _raw_request(
        gateway_url,
        _head(path, credential, 200) + b'{"model": "mock-echo"',
        [b" "] * 4,
        pause=0.3,
        read_timeout=5,
    )
    assert status == 408, answer[:300]
    assert_error_body(json.loads(answer.split(b"\r\n\r\n", 1)[1]))
    assert seconds < 3
    spend = redis_server.client().hgetall(f"gw:{{{key_id}}}:spend")
    assert int(spend.get("total", 0)) == int(spend.get("reserved", 0)) == 0


@pytest.mark.parametrize(
    ("path", "who", "size"),
    [
        pytest.param("/v1/chat/completions", "key", 1_100_000, id="chat-over-1MiB"),
        pytest.param(f"{API}/complete", "key", 1_100_000, id="native-over-1MiB"),
        pytest.param(f"{API}/keys", "admin", 70_000, id="admin-over-64KiB"),
        pytest.param(f"{API}/prompts/big", "admin", 140_000, id="template-body-over-limit"),
    ],
)
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_oversized_body_is_413(
    gateway_url: str, mint: Any, admin_key: str, path: str, who: str, size: int, declared: bool
) -> None:
    key, _ = mint()
    payload = json.dumps(
        {
            "model": "mock-echo",
            "name": "n",
            "template": "x" * size,
            "messages": [{"role": "user", "content": "x" * size}],
        }
    ).encode()
    content: Any = (
        payload
        if declared
        else iter([payload[i : i + 65536] for i in range(0, len(payload), 65536)])
    )
    response = _sent(
        httpx.post(
            gateway_url + path,
            content=content,
            timeout=15,
            headers={
                "authorization": f"Bearer {key if who == 'key' else admin_key}",
                "content-type": "application/json",
            },
        )
    )
    assert response.status_code == 413, response.text[:300]
    assert_error_body(response.json())


def test_template_and_variables_are_bounded(
    gateway_url: str, admin: httpx.Client, mint: Any
) -> None:
    """Under the body limit but over the template (64 KiB) or variables limit: a 400 that
    names the field, and nothing stored or charged."""
    big = admin.post("/prompts/big", json={"template": "x" * 65_537})
    assert big.status_code == 400 and "template" in big.json()["error"]["message"]
    assert admin.get("/prompts/big").status_code == 404
    assert admin.post("/prompts/small", json={"template": "Hi {{who}}"}).status_code == 201
    heavy = {"variables": {"who": "y" * 65_537}}
    rendered = admin.post("/prompts/small/render", json=heavy)
    assert rendered.status_code == 400 and "variables" in rendered.json()["error"]["message"]
    key, key_id = mint()
    body = {**CHAT, "model": "mock-echo", "prompt": {"name": "small", **heavy}}
    refused = _sent(
        httpx.post(
            gateway_url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
        )
    )
    assert refused.status_code == 400, refused.text[:300]
    assert admin.get(f"/keys/{key_id}").json()["spend"] == 0
    FIGURES.requests_sent += 5


@pytest.fixture(scope="module")
def served(
    openai_up: Upstream, anthropic_up: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, str]]:
    """`gateway serve` as operators run it, for limits that live in the HTTP server."""
    redis_server = RedisServer().start()
    folder = tmp_path_factory.mktemp("served")
    limits = {"max_header_bytes": HEAD_LIMIT, "header_timeout_seconds": HEAD_SECONDS}
    config = write_config(
        folder / "gateway.yaml",
        config_dict({"openai": openai_up, "claude": anthropic_up}, limits=limits),
    )
    admin_key = "sk-admin-" + uuid.uuid4().hex
    env = {
        "GATEWAY_REDIS_URL": redis_server.url,
        "GATEWAY_ADMIN_KEY": admin_key,
        "GATEWAY_DATA_DIR": str(folder / "data"),
        **UPSTREAM_KEYS,
    }
    gateway = GatewayProcess(config, env, workers=1).start()
    minted = httpx.post(
        gateway.url + f"{API}/keys",
        json={"name": "served"},
        headers={"authorization": f"Bearer {admin_key}"},
    ).json()
    yield gateway, minted["key"]
    gateway.stop()
    redis_server.stop()


HEAD_LIMIT = 16_384
HEAD_SECONDS = 1.5


def _answer_json(answer: bytes) -> Any:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:300]
    return json.loads(body)


@pytest.mark.parametrize(
    ("shape", "status"),
    [
        ("one-huge-header", 431),
        ("many-headers", 431),
        ("head-just-under-the-limit", 200),
        ("head-just-over-the-limit", 431),
    ],
)
def test_oversized_headers_are_refused(
    served: tuple[GatewayProcess, str], shape: str, status: int
) -> None:
    """httptools would buffer a head of any size; the gateway's protocol stops at the limit
    (`limits.max_header_bytes`) with a 431 and the JSON error body."""
    gateway, key = served
    if shape == "one-huge-header":
        extra = b"X-Big: " + b"a" * 1_048_576 + b"\r\n"
    elif shape == "many-headers":
        extra = b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))
    elif shape == "head-just-under-the-limit":
        extra = b"X-Big: " + b"a" * (HEAD_LIMIT - 1024) + b"\r\n"
    else:  # over by a few bytes, all in one write
        extra = b"X-Big: " + b"a" * HEAD_LIMIT + b"\r\n"
    body = json.dumps({**CHAT, "model": "mock-echo"}).encode()
    head = _head("/v1/chat/completions", key, len(body))
    answer_status, answer, _ = _raw_request(
        gateway.url, head[:-2] + extra + b"\r\n" + body, [], pause=0, read_timeout=10
    )
    assert answer_status == status, answer[:300]
    if status != 200:
        assert _answer_json(answer)["error"]["code"] == "headers_too_large"
    assert httpx.get(gateway.url + "/healthz").status_code == 200


def test_headers_that_never_complete_are_cut(served: tuple[GatewayProcess, str]) -> None:
    """A head that is still arriving `limits.header_timeout_seconds` after its first byte
    gets a 408 and the connection closes, however steadily the bytes trickle in."""
    gateway, _ = served
    port = int(gateway.url.rsplit(":", 1)[1])
    started = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=HEAD_SECONDS + 5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with contextlib.suppress(OSError):
            for i in range(100):  # one header every 0.2 s: never idle, never done
                time.sleep(0.2)
                sock.sendall(b"X-Slow-%d: x\r\n" % i)
        answer = _read_answer(sock)
    FIGURES.requests_sent += 1
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert _answer_json(answer)["error"]["code"]
    assert HEAD_SECONDS <= time.monotonic() - started < HEAD_SECONDS + 3
    assert httpx.get(gateway.url + "/healthz").status_code == 200


@pytest.mark.parametrize(
    "extra",
    [b"X-Request-Id: a\x00b\r\n", b"Transfer-Encoding: chunked\r\n", b"Bad Name: x\r\n"],
    ids=["NUL-in-header", "chunked-and-length", "space-in-name"],
)
def test_malformed_http_gets_the_json_error_body(
    served: tuple[GatewayProcess, str], extra: bytes
) -> None:
    gateway, key = served
    body = json.dumps({**CHAT, "model": "mock-echo"}).encode()
    head = _head("/v1/chat/completions", key, len(body))
    status, answer, _ = _raw_request(
        gateway.url, head[:-2] + extra + b"\r\n" + body, [], pause=0, read_timeout=10
    )
    assert status == 400, answer[:300]
    error = _answer_json(answer)["error"]
    assert error["type"] == "invalid_request_error" and "malformed HTTP" in error["message"]


def test_slow_body_408_closes_a_keep_alive_connection(
    gateway_url: str, mint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a 408 for a body that dawdles, the rest of it must not hold the connection."""
    monkeypatch.setattr(http_module, "BODY_SECONDS", 1)
    key, _ = mint()
    head = _head("/v1/chat/completions", key, 100_000).replace(b"Connection: close\r\n", b"")
    port = int(gateway_url.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + b'{"model": ')
        answer = _read_answer(sock)
        for _ in range(10):  # keep trickling: a connection left open would never end
            with contextlib.suppress(OSError):
                sock.sendall(b" ")
            time.sleep(0.1)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:  # still open after 5 s
            closed = False
        except OSError:  # reset by the server: closed too
            closed = True
    FIGURES.requests_sent += 1
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"connection: close" in answer.lower()
    assert closed and time.monotonic() - started < 4


def test_a_body_after_an_early_answer_is_not_counted_as_a_head(
    served: tuple[GatewayProcess, str],
) -> None:
    """A request answered before its body is read (401 here) leaves the body to arrive;
    those bytes are body, never the next request's head."""
    gateway, key = served
    big = json.dumps({**CHAT, "model": "mock-echo", "pad": "x" * (HEAD_LIMIT * 8)}).encode()
    first = _head("/v1/chat/completions", "sk-gw-wrong", len(big)).replace(
        b"Connection: close\r\n", b""
    )
    second = json.dumps({**CHAT, "model": "mock-echo"}).encode()
    then = _head("/v1/chat/completions", key, len(second))
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(first + big + then + second)
        answers = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                answers += chunk
    FIGURES.requests_sent += 2
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)]
    assert statuses == [401, 200], answers[:600]


def test_websocket_upgrade_is_served_as_plain_http(served: tuple[GatewayProcess, str]) -> None:
    """No endpoint speaks WebSocket: an upgrade request gets the JSON answer of plain HTTP."""
    gateway, _ = served
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={**CHAT, "model": "mock-echo"},
        headers={
            "connection": "upgrade",
            "upgrade": "websocket",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
            "sec-websocket-version": "13",
        },
    )
    FIGURES.requests_sent += 1
    assert response.status_code == 401
    assert_error_body(response.json())
