"""Real faults: Redis servers killed and restarted under the gateway, script caches flushed,
stand-in providers failing in every way they can, clients that walk away mid-stream.

After each fault the books are audited straight from Redis: every key's settled spend is
the sum of its usage records, no reservation is left open, every request the client saw
served left exactly one record and every refused one none. The figures (faults injected,
requests sent, lost, double charges, cents over a cap) are written to FIGURES_PATH for
the README's "Reliability" section.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import config as config_module
from gateway import keys
from gateway import store as store_module
from gateway.admission import Gate
from gateway.app import create_app
from gateway.errors import StoreUnavailable
from gateway.keys import KeySpec, Slots
from gateway.store import Store
from tests.conftest import config_dict
from tests.servers import RedisServer, ThreadServer, free_port, wait_until
from tests.upstreams import Upstream, openai_upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

FIGURES_PATH = Path(tempfile.gettempdir()) / "ai-gateway-reliability.json"
# Redis keeps every write on disk before it answers, so a killed server comes back with
# the keys, spend and reservations it acknowledged (a production setting for spend data).
DURABLE = ["--appendonly", "yes", "--appendfsync", "always"]
REQUEST_TIMEOUT = 3.0
LEASE_MARGIN = 0.5
PROVIDER_TIMEOUT = 1.0
# What a request may take while Redis is away (it is refused at once today) with margin.
ANSWER_BOUND = 10.0


# --- figures -------------------------------------------------------------------------------


@dataclass
class Figures:
    faults_injected: int = 0
    requests_sent: int = 0
    requests_served: int = 0
    requests_refused: int = 0
    requests_lost: int = 0  # served to the client, no usage record
    charged_unserved: int = 0  # a usage record for a request the client saw refused
    double_charges: int = 0  # more than one record for one request
    cents_over_cap: float = 0.0
    books_audited: int = 0
    orphans_reclaimed_by_lease: int = 0

    def add(self, other: Figures) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


# Times measured by the fault tests (seconds), published beside the counts.
MEASURED: dict[str, float] = {}


def publish(module: str, figures: Figures) -> None:
    """Merge one module's figures into FIGURES_PATH, with totals over every module of this
    test run (a file left by an earlier run is started afresh)."""
    try:
        saved = json.loads(FIGURES_PATH.read_text())
    except (OSError, ValueError):
        saved = {}
    modules = saved.get("modules", {}) if saved.get("run") == os.getpid() else {}
    modules[module] = asdict(figures)
    total = Figures()
    for values in modules.values():
        total.add(Figures(**values))
    measured = saved.get("measured", {}) if saved.get("run") == os.getpid() else {}
    measured.update(MEASURED)
    report = {"run": os.getpid(), "modules": modules, "total": asdict(total), "measured": measured}
    FIGURES_PATH.write_text(json.dumps(report, indent=2))


FIGURES = Figures()
# One pooled client for every test request: a fresh client per request costs more CPU
# (its TLS context) than the request itself, and the gateway under test shares the GIL.
HTTP = httpx.Client(limits=httpx.Limits(max_connections=64))


@pytest.fixture(scope="module", autouse=True)
def _publish_figures() -> Iterator[None]:
    yield
    HTTP.close()
    publish("test_faults", FIGURES)


# --- traffic and the books -------------------------------------------------------------------


@dataclass
class Answer:
    request_id: str
    status: int  # 0: no answer (a transport error)
    body: Any
    headers: dict[str, str]
    seconds: float
    started: float
    finished: float
    outcome: str  # served | partial | refused | failed


@dataclass
class Traffic:
    """Requests sent to a gateway, each with its own x-request-id, and what came back."""

    url: str
    figures: Figures
    answers: list[Answer] = field(default_factory=list)
    http: httpx.Client = field(default_factory=lambda: HTTP)

    def complete(
        self,
        key: str,
        *,
        model: str = "mock-echo",
        stream: bool = False,
        content: str = "fault",
        timeout: float = 15.0,
        **extra: Any,
    ) -> Answer:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        if stream:
            body["stream"] = True
        request_id = "t-" + uuid.uuid4().hex
        headers = {"authorization": f"Bearer {key}", "x-request-id": request_id}
        started = time.monotonic()
        try:
            if stream:
                answer = self._stream(body, headers, timeout)
            else:
                response = self.http.post(
                    self.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout
                )
                answer = (response.status_code, _json(response), dict(response.headers))
        except httpx.HTTPError as exc:
            answer = (0, repr(exc), {})
        finished = time.monotonic()
        status, payload, got = answer
        outcome = _outcome(status, payload, stream)
        result = Answer(
            request_id, status, payload, got, finished - started, started, finished, outcome
        )
        self.answers.append(result)
        self.figures.requests_sent += 1
        self.figures.requests_served += outcome in ("served", "partial")
        self.figures.requests_refused += outcome in ("refused", "failed")
        return result

    def _stream(
        self, body: dict[str, Any], headers: dict[str, str], timeout: float
    ) -> tuple[int, Any, dict[str, str]]:
        with self.http.stream(
            "POST",
            self.url + "/v1/chat/completions",
            json=body,
            headers=headers,
            timeout=timeout,
        ) as response:
            if response.headers.get("content-type", "").startswith("application/json"):
                response.read()
                return response.status_code, _json(response), dict(response.headers)
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            return response.status_code, events, dict(response.headers)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _outcome(status: int, payload: Any, stream: bool) -> str:
    if status == 0:
        return "failed"
    if status != 200:
        return "refused"
    if not stream:
        return "served"
    return "served" if payload and payload[-1] == "[DONE]" else "partial"


def stream_text(events: list[str]) -> str:
    text = ""
    for event in events:
        if event == "[DONE]":
            continue
        chunk = json.loads(event)
        for choice in chunk.get("choices") or ():
            text += (choice.get("delta") or {}).get("content") or ""
    return text


def assert_error_body(body: Any) -> None:
    assert isinstance(body, dict), body
    error = body.get("error")
    assert isinstance(error, dict), body
    for name in ("message", "type", "code"):
        assert isinstance(error.get(name), str) and error[name], body


@dataclass
class Books:
    """One key's accounts, read straight from Redis (nano-USD)."""

    key_id: str
    settled: int
    months: dict[str, int]
    reserved: int
    open: dict[str, str]
    records: list[dict[str, str]]
    hard_cap: int
    monthly_cap: int

    @property
    def recorded(self) -> int:
        return sum(int(r.get("cost", 0)) for r in self.records)

    @property
    def over_cap(self) -> int:
        over = 0
        if self.hard_cap:
            over = max(over, self.settled - self.hard_cap)
        if self.monthly_cap:
            over = max(over, *(m - self.monthly_cap for m in self.months.values()), 0)
        return over


def read_books(client: Any) -> list[Books]:
    books = []
    for key_id in sorted(client.smembers("gw:keys")):
        slots = Slots.of(key_id)
        spend = client.hgetall(slots.spend)
        record = client.hgetall(slots.record)
        held = client.hgetall(slots.resv)
        books.append(
            Books(
                key_id=key_id,
                settled=int(spend.get("total", 0)),
                months={k: int(v) for k, v in spend.items() if k.startswith("m:")},
                reserved=int(spend.get("reserved", 0)),
                open={k: v for k, v in held.items() if v != "s"},
                records=[fields for _, fields in client.xrange(slots.usage)],
                hard_cap=int(record.get("hard", 0)),
                monthly_cap=int(record.get("monthly", 0)),
            )
        )
    return books


def audit(client: Any, answers: list[Answer], figures: Figures) -> list[str]:
    """Check the books against what the clients saw; count the figures; return problems."""
    problems = []
    books = read_books(client)
    per_request: Counter[str] = Counter()
    for account in books:
        figures.books_audited += 1
        if account.settled != account.recorded:
            problems.append(
                f"{account.key_id}: settled {account.settled} != records {account.recorded}"
            )
        if account.reserved != 0 or account.open:
            problems.append(f"{account.key_id}: reserved {account.reserved}, open {account.open}")
        figures.cents_over_cap += account.over_cap / 10**7
        if account.over_cap:
            problems.append(f"{account.key_id}: {account.over_cap} nano-USD over a cap")
        per_request.update(r.get("request_id", "") for r in account.records)

    outcomes = {a.request_id: a.outcome for a in answers}
    for request_id, count in per_request.items():
        if count > 1:
            figures.double_charges += count - 1
            problems.append(f"{request_id}: {count} usage records")
        if outcomes.get(request_id) in ("refused", "failed"):
            figures.charged_unserved += 1
            problems.append(f"{request_id}: refused, yet recorded")
    for answer in answers:
        if answer.outcome in ("served", "partial") and answer.request_id not in per_request:
            figures.requests_lost += 1
            problems.append(f"{answer.request_id}: served ({answer.status}), no usage record")
    return problems


def settle_down(client: Any, timeout: float = 8.0) -> None:
    """Wait for deferred settlements (the gateway retries them in the background)."""
    with contextlib.suppress(TimeoutError):  # the audit then names what is still open
        wait_until(lambda: all(b.reserved == 0 for b in read_books(client)), timeout=timeout)


# --- servers ---------------------------------------------------------------------------------


def fault_config(upstreams: dict[str, Upstream], **limits: Any) -> config_module.Config:
    """Short timeouts, and routes whose first provider is a closed port."""
    limits = {
        "request_timeout_seconds": REQUEST_TIMEOUT,
        "lease_margin_seconds": LEASE_MARGIN,
        **limits,
    }
    raw = config_dict(upstreams, limits=limits)
    for name in ("openai", "claude"):
        raw["providers"][name]["timeout_seconds"] = PROVIDER_TIMEOUT
    dead = f"http://127.0.0.1:{free_port()}/v1"
    raw["providers"]["dead"] = {"type": "openai", "base_url": dead, "timeout_seconds": 1}
    price = {k: raw["models"]["gpt"][k] for k in ("input_per_1k", "output_per_1k")}
    raw["models"]["dead"] = {**price, "routes": [{"provider": "dead", "model": "x"}]}
    raw["models"]["dead-first"] = {
        **price,
        "routes": [
            {"provider": "dead", "model": "x"},
            {"provider": "claude", "model": "claude-up"},
        ],
    }
    return config_module.parse(raw, "fault config")


def serve(redis_url: str, upstreams: dict[str, Upstream], **limits: Any) -> ThreadServer:
    return ThreadServer(create_app(fault_config(upstreams, **limits), redis_url)).start()


def mint(url: str, admin_key: str, **spec: Any) -> tuple[str, str]:
    response = httpx.post(
        url + "/api/ai-gateway/keys",
        json={"name": "fault", **spec},
        headers={"authorization": f"Bearer {admin_key}"},
        timeout=15,
    )
    FIGURES.requests_sent += 1
    assert response.status_code == 201, response.text
    return response.json()["key"], response.json()["record"]["id"]


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.extra_args = DURABLE
    yield server
    server.stop()


def established_to(port: int) -> int:
    """TCP connections in ESTABLISHED state whose far end is 127.0.0.1:`port`."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


# --- Redis faults ----------------------------------------------------------------------------


def test_store_down_at_start_is_503_then_recovers(
    durable_redis: RedisServer, upstreams: dict[str, Upstream], admin_key: str
) -> None:
    gateway = serve(durable_redis.url, upstreams)  # Redis is not started yet
    FIGURES.faults_injected += 1
    traffic = Traffic(gateway.url, FIGURES)
    try:
        ready = httpx.get(gateway.url + "/readyz", timeout=15)
        assert ready.status_code == 503
        assert_error_body(ready.json())
        admin = {"authorization": f"Bearer {admin_key}"}
        calls = [
            lambda: httpx.post(
                gateway.url + "/api/ai-gateway/keys", json={"name": "x"}, headers=admin, timeout=15
            ),
            lambda: httpx.get(gateway.url + "/api/ai-gateway/usage", headers=admin, timeout=15),
            lambda: httpx.get(
                gateway.url + "/v1/models",
                timeout=15,
                headers={"authorization": "Bearer sk-gw-" + "A" * 43},
            ),
        ]
        with ThreadPoolExecutor(8) as pool:
            admin_calls = [pool.submit(call) for call in calls]
            completions = [pool.submit(traffic.complete, "sk-gw-" + "B" * 43) for _ in range(3)]
            refused = [f.result() for f in admin_calls]
            answers = [f.result() for f in completions]
        FIGURES.requests_sent += len(refused)
        for response in refused:
            assert response.status_code == 503, response.text
            assert_error_body(response.json())
        for answer in answers:
            assert answer.status == 503, answer.body
            assert answer.seconds < ANSWER_BOUND
            assert_error_body(answer.body)

        durable_redis.start()
        back = time.monotonic()
        wait_until(lambda: httpx.get(gateway.url + "/readyz").status_code == 200, timeout=10)
        recovered = time.monotonic() - back
        key, _ = mint(gateway.url, admin_key)
        served = traffic.complete(key)
        assert served.status == 200, served.body
        MEASURED["down_at_start_ready_after_redis_up"] = round(recovered, 3)
        assert recovered < 2.0, f"ready {recovered:.2f} s after Redis came back"
        assert audit(durable_redis.client(), traffic.answers, FIGURES) == []
    finally:
        gateway.stop()


def _hammer(traffic: Traffic, key: str, stop: threading.Event) -> None:
    while not stop.is_set():
        traffic.complete(key, timeout=30)


def test_store_killed_under_load_is_503_never_500_and_recovers(
    durable_redis: RedisServer, upstreams: dict[str, Upstream], admin_key: str
) -> None:
    durable_redis.start()
    gateway = serve(durable_redis.url, upstreams)
    traffic = Traffic(gateway.url, FIGURES)
    try:
        key, _ = mint(gateway.url, admin_key)
        stop = threading.Event()
        with ThreadPoolExecutor(6) as pool:
            clients = [pool.submit(_hammer, traffic, key, stop) for _ in range(6)]
            time.sleep(1.0)
            killed = time.monotonic()
            durable_redis.kill()
            FIGURES.faults_injected += 1
            time.sleep(2.0)
            durable_redis.start()  # same port, same data directory
            back = time.monotonic()
            time.sleep(3.0)
            stop.set()
            for client in clients:
                client.result()

        statuses = Counter(a.status for a in traffic.answers)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[503] > 0, "the outage was not seen"
        slowest = max(a.seconds for a in traffic.answers)
        assert slowest < ANSWER_BOUND, f"a request took {slowest:.1f} s"
        for answer in traffic.answers:
            if answer.status == 503:
                assert_error_body(answer.body)
        first_success = min(
            a.finished for a in traffic.answers if a.status == 200 and a.finished > back
        )
        MEASURED["under_load_first_success_after_redis_up"] = round(first_success - back, 3)
        MEASURED["under_load_slowest_answer"] = round(slowest, 3)
        MEASURED["under_load_requests"] = len(traffic.answers)
        MEASURED["under_load_503s"] = statuses[503]
        assert first_success - back < 2.0, f"first success {first_success - back:.2f} s after"
        late = [a for a in traffic.answers if a.started > back + 2.0]
        assert late and all(a.status == 200 for a in late)
        assert any(a.status == 200 and a.started < killed for a in traffic.answers)

        _reclaim_and_audit(durable_redis, traffic, key)
    finally:
        gateway.stop()


def _reclaim_and_audit(server: RedisServer, traffic: Traffic, key: str) -> None:
    """Deferred settlements land; reservations whose admission answer was lost with the
    server (so no worker holds them) come back at the next admission after their lease."""
    client = server.client()
    settle_down(client)
    orphans = sum(len(b.open) for b in read_books(client))
    if orphans:
        FIGURES.orphans_reclaimed_by_lease += orphans
        time.sleep(REQUEST_TIMEOUT + LEASE_MARGIN + 0.2)
        assert traffic.complete(key).status == 200
    assert audit(client, traffic.answers, FIGURES) == []


@pytest.mark.parametrize(
    "keep_data", [pytest.param(True, id="data-kept"), pytest.param(False, id="data-lost")]
)
def test_store_restart_is_handled_with_no_failed_request(
    durable_redis: RedisServer, upstreams: dict[str, Upstream], admin_key: str, keep_data: bool
) -> None:
    """After a restart the server has no scripts (NOSCRIPT) and the pool's connections are
    dead: the first requests after it must still succeed."""
    durable_redis.start()
    gateway = serve(durable_redis.url, upstreams)
    traffic = Traffic(gateway.url, FIGURES)
    try:
        key, _ = mint(gateway.url, admin_key)
        assert all(traffic.complete(key).status == 200 for _ in range(5))
        audit_before = audit(durable_redis.client(), traffic.answers, FIGURES)
        assert audit_before == []

        durable_redis.kill()
        if not keep_data:
            for path in Path(durable_redis.dir).rglob("*"):
                if path.is_file():
                    path.unlink()
            traffic.answers.clear()  # those records are gone with the data
        durable_redis.start()
        FIGURES.faults_injected += 1
        if not keep_data:
            key, _ = mint(gateway.url, admin_key)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: traffic.complete(key), range(16)))
        assert [a.status for a in answers] == [200] * 16, [
            a.body for a in answers if a.status != 200
        ]
        stream = traffic.complete(key, stream=True)
        assert stream.outcome == "served"
        settle_down(durable_redis.client(), timeout=3)
        assert audit(durable_redis.client(), traffic.answers, FIGURES) == []
    finally:
        gateway.stop()


def test_script_flush_is_handled_with_no_failed_request(
    redis_server: RedisServer, redis_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> None:
    gateway = serve(redis_url, upstreams)
    traffic = Traffic(gateway.url, FIGURES)
    try:
        key, _ = mint(gateway.url, admin_key)
        capped, _ = mint(gateway.url, admin_key, hard_cap=1)
        assert traffic.complete(key).status == 200
        for _ in range(3):
            redis_server.client().script_flush()
            FIGURES.faults_injected += 1
            with ThreadPoolExecutor(8) as pool:
                answers = list(
                    pool.map(lambda i: traffic.complete((key, capped)[i % 2]), range(16))
                )
            assert [a.status for a in answers] == [200] * 16, [a.body for a in answers]
        prompt = httpx.post(
            gateway.url + "/api/ai-gateway/prompts/flushed",
            json={"template": "hi {{x}}"},
            headers={"authorization": f"Bearer {admin_key}"},
        )
        FIGURES.requests_sent += 1
        assert prompt.status_code == 201  # add_prompt_version.lua, loaded again
        assert httpx.get(gateway.url + "/readyz").status_code == 200
        assert audit(redis_server.client(), traffic.answers, FIGURES) == []
    finally:
        gateway.stop()


class LossyProxy:
    """A TCP proxy in front of Redis that can lose the server's answers on the way back, as
    a network fault does: the commands still reach Redis and run, the client hears nothing.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.lose_answers = threading.Event()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if not (answers and self.lose_answers.is_set()):
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@pytest.fixture
def lossy(redis_server: RedisServer, redis_url: str) -> Iterator[LossyProxy]:
    proxy = LossyProxy(redis_server.port)
    yield proxy
    proxy.close()


async def test_timed_out_admission_is_never_reserved_twice(
    redis_server: RedisServer, lossy: LossyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real timeout: the admission runs on Redis but its answer is lost, so the call times
    out on the client. Replaying it (same reservation id, as a retry would) reserves nothing
    more; the reservation nobody will settle comes back at the first admission after its
    lease."""
    monkeypatch.setattr(store_module, "COMMAND_SECONDS", 0.2)
    store = Store(lossy.url)
    gate = Gate(store, lease_ms=1000, retention_ms=86_400_000)
    client = redis_server.client()
    try:
        raw, record = await keys.create(store, KeySpec(name="lossy", rate_per_min=100))
        slots = Slots.of(record["id"])
        await gate.release(await gate.admit(raw, "m", "warm-up", 1))  # connections are open
        lossy.lose_answers.set()
        FIGURES.faults_injected += 1
        with pytest.raises(StoreUnavailable):
            await gate.admit(raw, "m", "reservation-1", 1000)
        lossy.lose_answers.clear()
        assert client.hget(slots.resv, "reservation-1") == "1000"

        for _ in range(3):  # a retry with the same reservation id reserves nothing more
            again = await gate.admit(raw, "m", "reservation-1", 1000)
            assert again.reserved == 1000
        assert client.hget(slots.spend, "reserved") == "1000"
        assert client.zcard(slots.window) == 2  # the warm-up and this one

        time.sleep(1.1)  # past the lease
        await gate.admit(raw, "m", "reservation-2", 300)
        assert client.hget(slots.spend, "reserved") == "300"
        # The release the gate deferred when the admission timed out lands after the lease
        # gave the capacity back: it only marks the id settled, and gives back nothing twice.
        await gate.drain()
        assert client.hget(slots.resv, "reservation-1") == "s"
        assert client.hget(slots.spend, "reserved") == "300"
        FIGURES.requests_sent += 5
        FIGURES.orphans_reclaimed_by_lease += 1
    finally:
        await store.close()


def test_timed_out_admission_leaves_no_reservation_behind(
    redis_server: RedisServer,
    lossy: LossyProxy,
    upstreams: dict[str, Upstream],
    admin_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "COMMAND_SECONDS", 0.2)
    gateway = serve(lossy.url, upstreams, request_timeout_seconds=60)
    traffic = Traffic(gateway.url, FIGURES)
    try:
        key, _ = mint(gateway.url, admin_key, hard_cap=1)
        assert traffic.complete(key).status == 200  # connections are open
        lossy.lose_answers.set()
        FIGURES.faults_injected += 1
        answer = traffic.complete(key)
        lossy.lose_answers.clear()
        assert answer.status == 503
        time.sleep(0.5)  # a release, if the gateway sends one, lands
        books = read_books(redis_server.client())
        assert [(b.reserved, b.open) for b in books] == [(0, {})]
    finally:
        gateway.stop()


# --- upstream faults -------------------------------------------------------------------------

# (mode, model, stream) -> what the client sees: "claude" (served by the fallback route),
# "partial" (a stream that had begun ends with an error event) or an error status.
UPSTREAM_FAULTS = [
    ("status:500", "fallback", False, "claude"),
    ("status:503", "fallback", False, "claude"),
    ("status:429", "fallback", False, "claude"),
    ("malformed", "fallback", False, "claude"),
    ("cut", "fallback", False, "claude"),
    ("stall", "fallback", False, "claude"),
    ("slow", "fallback", False, "claude"),
    ("refused", "dead-first", False, "claude"),
    ("status:500", "gpt", False, 502),
    ("malformed", "gpt", False, 502),
    ("cut", "gpt", False, 502),
    ("stall", "gpt", False, 502),
    ("slow", "gpt", False, 502),
    ("refused", "dead", False, 502),
    ("status:400", "fallback", False, 400),
    ("status:500", "fallback", True, "claude"),
    ("status:429", "fallback", True, "claude"),
    ("slow", "fallback", True, "claude"),
    ("refused", "dead-first", True, "claude"),
    ("malformed", "fallback", True, "partial"),
    ("cut", "fallback", True, "partial"),
    ("stall", "fallback", True, "partial"),
    ("status:500", "gpt", True, 502),
    ("slow", "gpt", True, 502),
    ("refused", "dead", True, 502),
    ("stall", "gpt", True, "partial"),
    ("status:422", "gpt", True, 422),
]


@pytest.mark.parametrize(
    ("mode", "model", "stream", "expected"),
    [
        pytest.param(*case, id=f"{case[0]}-{case[1]}-{'stream' if case[2] else 'plain'}")
        for case in UPSTREAM_FAULTS
    ],
)
def test_upstream_fault_ends_in_fallback_or_clean_error(
    redis_server: RedisServer,
    redis_url: str,
    upstreams: dict[str, Upstream],
    admin_key: str,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    model: str,
    stream: bool,
    expected: str | int,
) -> None:
    gateway = serve(redis_url, upstreams)
    traffic = Traffic(gateway.url, FIGURES)
    try:
        key, _ = mint(gateway.url, admin_key, monthly_cap=1)
        upstreams["openai"].reply = " ".join(f"w{i}" for i in range(30))
        monkeypatch.setattr(upstreams["openai"], "stall_seconds", 4)
        if mode == "slow":
            upstreams["openai"].delay_seconds = PROVIDER_TIMEOUT + 1
        if mode != "refused":
            upstreams["openai"].mode = mode
        FIGURES.faults_injected += 1
        answer = traffic.complete(key, model=model, stream=stream, content="fault here")

        if expected == "claude":
            assert answer.status == 200, answer.body
            assert answer.headers["x-gateway-provider"] == "claude"
            text = (
                stream_text(answer.body)
                if stream
                else answer.body["choices"][0]["message"]["content"]
            )
            assert text == "echo: fault here"
            assert answer.outcome == "served"
        elif expected == "partial":
            assert answer.status == 200
            assert answer.outcome == "partial", answer.body
            assert "error" in json.loads(answer.body[-1])
            assert upstreams["claude"].requests == []
        else:
            assert answer.status == expected, answer.body
            assert_error_body(answer.body)
        assert answer.seconds < REQUEST_TIMEOUT + 1
        settle_down(redis_server.client(), timeout=3)
        assert audit(redis_server.client(), traffic.answers, FIGURES) == []
    finally:
        gateway.stop()


# --- clients that leave ----------------------------------------------------------------------


@pytest.fixture
def lone_upstream() -> Iterator[Upstream]:
    """A stand-in of its own, so its connections can be counted."""
    upstream = openai_upstream()
    yield upstream
    upstream.stop()


def _walk_away(url: str, key: str, request_id: str, model: str = "gpt") -> None:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "leave"}]}
    headers = {"authorization": f"Bearer {key}", "x-request-id": request_id}
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=10
    ) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: ")


@pytest.mark.parametrize("leave", ["mid-stream", "before-first-chunk"])
def test_client_that_leaves_cancels_upstream_and_is_settled(
    redis_server: RedisServer,
    redis_url: str,
    upstreams: dict[str, Upstream],
    lone_upstream: Upstream,
    admin_key: str,
    leave: str,
) -> None:
    own = {**upstreams, "openai": lone_upstream}
    # A long request timeout: only the client's leaving can end these requests early.
    gateway = serve(redis_url, own, request_timeout_seconds=60)
    port = int(lone_upstream.base_url.split(":")[2].split("/")[0])
    traffic = Traffic(gateway.url, FIGURES)
    try:
        key, key_id = mint(gateway.url, admin_key)
        lone_upstream.stall_seconds = 30
        lone_upstream.mode = "stall"
        FIGURES.faults_injected += 1
        request_id = "leave-" + uuid.uuid4().hex
        started = time.monotonic()
        if leave == "mid-stream":
            _walk_away(gateway.url, key, request_id)
        else:
            lone_upstream.delay_seconds = 30
            with pytest.raises(httpx.ReadTimeout):
                traffic_body = {
                    "model": "fallback",
                    "stream": True,
                    "messages": [{"role": "user", "content": "gone"}],
                }
                httpx.post(
                    gateway.url + "/v1/chat/completions",
                    json=traffic_body,
                    timeout=0.5,
                    headers={"authorization": f"Bearer {key}", "x-request-id": request_id},
                )
        FIGURES.requests_sent += 1
        wait_until(lambda: established_to(port) == 0, timeout=3)
        closed = time.monotonic() - started
        MEASURED[f"client_left_{leave}_upstream_closed_after"] = round(closed, 3)
        settle_down(redis_server.client(), timeout=3)
        books = {b.key_id: b for b in read_books(redis_server.client())}[key_id]
        assert books.reserved == 0 and not books.open
        if leave == "mid-stream":
            FIGURES.requests_served += 1
            assert [r["request_id"] for r in books.records] == [request_id]
            assert books.settled == books.recorded > 0
        else:
            FIGURES.requests_refused += 1
            assert books.records == [] and books.settled == 0
            assert upstreams["claude"].requests == []  # no fallback for a client that left
        assert closed < 3.0, f"upstream connection open {closed:.1f} s after the client left"
        assert audit(redis_server.client(), traffic.answers, FIGURES) == []
    finally:
        gateway.stop()


def test_store_down_during_stream_settles_later(
    durable_redis: RedisServer,
    upstreams: dict[str, Upstream],
    admin_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis dies while a stream is being relayed; the settlement is retried in the
    background and lands once Redis is back: the served request is not lost."""
    durable_redis.start()
    gateway = serve(durable_redis.url, upstreams)
    traffic = Traffic(gateway.url, FIGURES)
    try:
        key, _ = mint(gateway.url, admin_key)
        upstreams["openai"].mode = "stall"
        monkeypatch.setattr(upstreams["openai"], "stall_seconds", 0.8)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(traffic.complete, key, model="gpt", stream=True)
            time.sleep(0.4)
            durable_redis.kill()
            FIGURES.faults_injected += 1
            answer = pending.result()
        assert answer.outcome == "served", answer.body
        time.sleep(0.5)
        durable_redis.start()
        settle_down(durable_redis.client(), timeout=8)
        assert audit(durable_redis.client(), traffic.answers, FIGURES) == []
    finally:
        gateway.stop()


def test_figures_file_is_written() -> None:
    """The figures so far reach FIGURES_PATH (the module's teardown writes the final ones)."""
    publish("test_faults", FIGURES)
    saved = json.loads(FIGURES_PATH.read_text())
    assert saved["modules"]["test_faults"]["requests_sent"] == FIGURES.requests_sent
    assert os.access(FIGURES_PATH, os.R_OK)
