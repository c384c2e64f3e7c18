"""Observability: /metrics summed over workers, structured request logs, usage export."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.store import load_script
from tests.conftest import UPSTREAM_KEYS, chat_each, config_dict, write_config
from tests.servers import GatewayProcess, RedisServer, free_port, wait_until
from tests.test_topology import flood
from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
# No input price, 2,000 nano-USD per output token: a reservation is max_tokens x 2,000.
FLAT = {"input_per_1k": 0, "output_per_1k": 0.002, "max_output_tokens": 64}


def scrape(url: str) -> Samples:
    """Every sample of /metrics, by (name, labels)."""
    return parse(httpx.get(url + "/metrics").text)


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def by_key(samples: Samples, name: str) -> dict[str, float]:
    return {dict(labels)["key"]: v for (n, labels), v in samples.items() if n == name}


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


def start_gateway(
    tmp_path: Path, redis_url: str, upstreams: dict[str, Upstream], admin_key: str, **overrides: Any
) -> GatewayProcess:
    """`gateway serve` with two workers; their samples go to tmp_path/metrics."""
    raw = config_dict(upstreams, **overrides)
    dead = {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"}
    raw["providers"]["dead"] = dead
    raw["models"]["shaky"] = {
        **{k: raw["models"]["gpt"][k] for k in ("input_per_1k", "output_per_1k")},
        "routes": [{"provider": "dead", "model": "x"}, {"provider": "openai", "model": "up"}],
    }
    raw["models"]["flat"] = {**FLAT, "routes": [{"provider": "openai", "model": "up"}]}
    env = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_ADMIN_KEY": admin_key,
           "GATEWAY_LOG_FORMAT": "json", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
           **UPSTREAM_KEYS}  # fmt: skip
    return GatewayProcess(write_config(tmp_path / "g.yaml", raw), env, workers=2).start()


@pytest.fixture
def two_workers(
    tmp_path: Path, redis_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path, redis_url, upstreams, admin_key)
    yield process
    process.stop()


def new_key(url: str, admin_key: str, **spec: Any) -> tuple[str, str]:
    created = httpx.post(url + "/api/ai-gateway/keys", json={"name": "m", **spec},
                         headers={"authorization": f"Bearer {admin_key}"}).json()  # fmt: skip
    return created["key"], created["record"]["id"]


def ask(url: str, key: str, text: str, max_tokens: int, model: str = "flat") -> int:
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens}  # fmt: skip
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(
        url + "/v1/chat/completions", json=body, headers=headers, timeout=30
    ).status_code


def test_metrics_count_exactly_across_workers(two_workers: GatewayProcess, admin_key: str) -> None:
    url = two_workers.url
    admin = {"authorization": f"Bearer {admin_key}"}
    created = httpx.post(url + "/api/ai-gateway/keys", json={"name": "m", "rate_per_min": 30},
                         headers=admin).json()  # fmt: skip
    key, key_id = created["key"], created["record"]["id"]
    results = asyncio.run(flood(url, [key], 40))  # 30 served, 10 rate limited
    headers = {"authorization": f"Bearer {key}"}
    other = httpx.post(url + "/api/ai-gateway/keys", json={"name": "n"}, headers=admin).json()
    other_headers = {"authorization": f"Bearer {other['key']}"}
    body = {"model": "gpt", "messages": [{"role": "user", "content": "r0"}]}
    hit = httpx.post(url + "/v1/chat/completions", json=body, headers=other_headers)
    hit = httpx.post(url + "/v1/chat/completions", json=body, headers=other_headers)
    for i in range(3):
        shaky = {"model": "shaky", "messages": [{"role": "user", "content": f"fall back {i}"}]}
        assert httpx.post(url + "/v1/chat/completions", json=shaky, headers=other_headers)
    assert hit.headers["x-gateway-cache"] == "hit"
    assert [s for _, s in results].count(429) == 10
    assert httpx.post(url + "/v1/chat/completions", json=body, headers=headers).status_code == 429

    text = httpx.get(url + "/metrics").text
    assert "sk-gw-" not in text and admin_key not in text  # key ids only
    samples = parse(text)
    requests = "gateway_requests_total"
    assert total(samples, requests, model="gpt", status="200", cache="miss") == 31
    assert total(samples, requests, model="gpt", status="200", cache="hit") == 1
    assert total(samples, requests, status="429") == 11
    assert total(samples, requests, model="shaky", provider="openai", status="200") == 3
    assert total(samples, "gateway_refusals_total", reason="rate_limited") == 11
    assert total(samples, "gateway_fallbacks_total", model="shaky", provider="dead") == 3
    assert total(samples, "gateway_provider_errors_total", provider="dead", kind="connection") == 3
    assert total(samples, "gateway_overhead_seconds_count") == 46
    assert total(samples, "gateway_upstream_seconds_count", provider="openai") == 34
    assert total(samples, "gateway_open_reservations") == 0
    # 30 + 1 served "r<i>" (1 word + 3 per message) and 3 "fall back <i>" (3 words + 3).
    assert total(samples, "gateway_tokens_total", model="gpt", direction="input") == 31 * 4
    assert total(samples, "gateway_tokens_total", model="shaky", direction="input") == 3 * 6
    assert total(samples, "gateway_tokens_total", direction="input") == 142

    records = httpx.get(url + "/api/ai-gateway/usage", params={"limit": 1000}, headers=admin)
    served = [r for r in records.json()["records"] if not r["cached"]]
    assert total(samples, "gateway_tokens_total", direction="output") == sum(
        r["output_tokens"] for r in served
    )
    assert sum(r["input_tokens"] for r in served) == 142
    spend = total(samples, "gateway_spend_usd_total", key=key_id)
    assert spend == pytest.approx(sum(r["cost"] for r in served if r["key_id"] == key_id))


def test_spend_cap_refusals_and_cap_use_are_exact(
    two_workers: GatewayProcess, admin_key: str
) -> None:
    """A $0.0001 lifetime cap (100,000 nano-USD; the monthly cap of $0.001 is looser): each
    admission reports (settled + reserved, this request included) / cap, a 402 reports
    (settled + reserved) / cap, whichever worker decided."""
    url = two_workers.url
    capped, capped_id = new_key(url, admin_key, hard_cap=0.0001, monthly_cap=0.001)
    free, _ = new_key(url, admin_key)
    words = " ".join(f"w{i}" for i in range(30))  # answers cut at max_tokens: charge = reserved
    assert ask(url, capped, f"a {words}", 20) == 200  # 40,000 reserved of 100,000: 0.4
    assert ask(url, capped, f"b {words}", 20) == 200  # 80,000 after it: 0.8
    assert ask(url, capped, "c", 5) == 200  # 80,000 + 10,000 reserved: 0.9; charged 4,000
    assert ask(url, free, "f", 20) == 200  # no cap: no ratio
    assert by_key(scrape(url), "gateway_key_cap_used_ratio") == {capped_id: 0.9}

    assert [ask(url, capped, f"d{i}", 20) for i in range(2)] == [402, 402]  # 84,000 + 40,000
    samples = scrape(url)
    assert by_key(samples, "gateway_key_cap_used_ratio") == {capped_id: 0.84}
    assert total(samples, "gateway_refusals_total", reason="spend_cap") == 2
    assert total(samples, "gateway_refusals_total") == 2
    assert total(samples, "gateway_requests_total", model="flat", status="402") == 2
    assert total(samples, "gateway_requests_total", model="flat", status="200") == 4
    # "a"/"b" + 30 words + 3 per message, "c" and "f" 1 word + 3.
    assert total(samples, "gateway_tokens_total", model="flat", direction="input") == 34 * 2 + 4 * 2
    assert (
        total(samples, "gateway_tokens_total", model="flat", direction="output") == 20 * 2 + 2 * 2
    )
    assert total(samples, "gateway_spend_usd_total", key=capped_id) == pytest.approx(84_000e-9)


def test_per_key_labels_off_leaves_no_key_in_metrics(
    tmp_path: Path, redis_url: str, upstreams: dict[str, Upstream], admin_key: str
) -> None:
    process = start_gateway(
        tmp_path, redis_url, upstreams, admin_key, metrics={"per_key_labels": False}
    )
    try:
        key, key_id = new_key(process.url, admin_key, hard_cap=0.0001)
        words = " ".join(f"w{i}" for i in range(30))  # each charged its 40,000 reserved
        asked = [ask(process.url, key, f"q{i} {words}", 20) for i in range(3)]
        assert asked == [200, 200, 402]
        text = httpx.get(process.url + "/metrics").text
    finally:
        process.stop()
    samples = parse(text)
    assert by_key(samples, "gateway_spend_usd_total") == {"-": pytest.approx(80_000e-9)}
    assert "gateway_key_cap_used_ratio{" not in text
    assert "sk-gw-" not in text and key_id not in text


def test_open_reservations_count_requests_in_flight(
    two_workers: GatewayProcess, upstreams: dict[str, Upstream], admin_key: str
) -> None:
    url = two_workers.url
    key, _ = new_key(url, admin_key)
    upstreams["openai"].delay_seconds = 3  # under the provider's 5 s timeout
    statuses: list[int] = []
    senders = [
        threading.Thread(target=lambda i=i: statuses.append(ask(url, key, f"held {i}", 5)))
        for i in range(5)
    ]
    for sender in senders:
        sender.start()
    wait_until(lambda: len(upstreams["openai"].requests) == 5)
    assert total(scrape(url), "gateway_open_reservations") == 5
    for sender in senders:
        sender.join()
    assert statuses == [200] * 5
    assert total(scrape(url), "gateway_open_reservations") == 0


def test_a_dead_workers_open_reservations_leave_the_sum(
    two_workers: GatewayProcess, tmp_path: Path
) -> None:
    """A worker killed mid-request never decrements its gauge: a scrape drops its file."""
    folder = tmp_path / "metrics"
    died = subprocess.run(
        [sys.executable, "-c", "import os; from gateway import metrics; "
         "metrics.OPEN_RESERVATIONS.inc(3); print(os.getpid())"],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    left = folder / f"gauge_livesum_{died.stdout.strip()}.db"
    assert left.exists()
    assert total(scrape(two_workers.url), "gateway_open_reservations") == 0
    assert not left.exists()


def test_request_log_is_one_json_line_per_request(
    two_workers: GatewayProcess, admin_key: str
) -> None:
    admin = {"authorization": f"Bearer {admin_key}"}
    created = httpx.post(two_workers.url + "/api/ai-gateway/keys", json={"name": "l"},
                         headers=admin).json()  # fmt: skip
    response = httpx.post(
        two_workers.url + "/v1/chat/completions",
        json={"model": "gpt", "messages": [{"role": "user", "content": "logged"}]},
        headers={"authorization": f"Bearer {created['key']}", "x-request-id": "trace-42"},
    )
    assert response.headers["x-request-id"] == "trace-42"
    log = two_workers.stop()
    lines = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "trace-42"]
    assert len(mine) == 1
    entry = mine[0]
    assert (entry["key"], entry["model"], entry["provider"], entry["status"]) == (
        created["record"]["id"], "gpt", "openai", 200,
    )  # fmt: skip
    assert entry["input_tokens"] > 0 and entry["output_tokens"] == 2
    assert float(entry["cost"]) > 0 and entry["cache"] == "miss" and entry["latency_ms"] > 0
    assert created["key"] not in log and admin_key not in log


def fill(redis_server: RedisServer, key_ids: list[str], first: int, count: int) -> int:
    """`count` usage records through the real settle script; returns their total cost."""
    client = redis_server.client()
    sha = client.script_load(load_script("settle_request"))
    settled = 0
    for start in range(first, first + count, 2000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + 2000, first + count)):
            tag = f"gw:{{{key_ids[i % len(key_ids)]}}}"
            parts = ("spend", "resv", "lease", "usage", "totals", "key")
            keys = [f"{tag}:{part}" for part in parts]
            cost = 1000 + i % 7
            settled += cost
            args = [f"r{i}", cost, 1, 86_400_000, 1000, "gpt", 3, 4, "", 0, 0,
                    "provider", "openai", "cached", 0, "request_id", f"req{i}"]  # fmt: skip
            pipe.evalsha(sha, len(keys), *keys, *args)
        pipe.execute()
    return settled


def export_peak(gateway_url: str, admin_key: str, out: Path) -> int:
    """Run `gateway usage export` into `out`; the peak RSS of that process, in KiB."""
    wrapper = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    command = [sys.executable, "-m", "gateway", "usage", "export", "--output", str(out)]
    env = {"GATEWAY_URL": gateway_url, "GATEWAY_ADMIN_KEY": admin_key, "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *command],
        env=env, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return int(done.stdout.strip())


def test_export_100k_records_in_bounded_memory(
    gateway_url: str, mint: Any, redis_server: RedisServer, admin_key: str, tmp_path: Path
) -> None:
    key_ids = [mint()[1] for _ in range(4)]
    settled = fill(redis_server, key_ids, 0, 10_000)
    small_peak = export_peak(gateway_url, admin_key, tmp_path / "small.jsonl")
    settled += fill(redis_server, key_ids, 10_000, 90_000)
    large_peak = export_peak(gateway_url, admin_key, tmp_path / "large.jsonl")

    exported = 0
    cost_nano = 0
    with (tmp_path / "large.jsonl").open("rb") as lines:
        for line in lines:
            exported += 1
            cost_nano += orjson.loads(line)["cost_nano"]
    spend = sum(int(redis_server.client().hget(f"gw:{{{k}}}:spend", "total") or 0) for k in key_ids)
    assert exported == 100_000
    assert cost_nano == settled == spend
    assert large_peak < small_peak + 20 * 1024, (small_peak, large_peak)


def test_usage_totals_per_key_model_and_period(
    gateway_url: str, mint: Any, admin: httpx.Client, redis_server: RedisServer
) -> None:
    key, key_id = mint()
    chat_each(gateway_url, key, ["a", "b b", "c c c"])
    records = admin.get("/usage", params={"key": key_id}).json()["records"]
    for period in ("day", "month"):
        rows = admin.get("/usage/totals", params={"key": key_id, "period": period}).json()
        (row,) = rows["totals"]
        assert (row["key_id"], row["model"], row["requests"]) == (key_id, "gpt", 3)
        assert row["output_tokens"] == sum(r["output_tokens"] for r in records)
        assert row["cost_nano"] == sum(r["cost_nano"] for r in records)
        assert len(row[period]) == (10 if period == "day" else 7)
    assert admin.get("/usage/totals", params={"period": "year"}).status_code == 400


def test_dashboard_queries_only_metrics_the_gateway_exports() -> None:
    import re

    from gateway import metrics

    dashboard = orjson.loads((Path(__file__).parent.parent / "deploy/grafana/ai-gateway.json")
                             .read_bytes())  # fmt: skip
    exported = {
        m._name for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "labels")
    }
    used = {
        re.sub(r"_(bucket|total|sum|count)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"gateway_[a-z_]+", target["expr"])
    }
    assert used and used <= {re.sub(r"_total$", "", n) for n in exported}
