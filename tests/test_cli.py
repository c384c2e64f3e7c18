"""The `gateway` command against a running gateway."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner

from gateway.cli import EXPORT_FIELDS, main
from gateway.keys import Slots
from tests.conftest import chat_each
from tests.servers import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture
def run(gateway_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("GATEWAY_URL", gateway_url)
    return CliRunner()


def test_keys_lifecycle(run: CliRunner) -> None:
    created = run.invoke(main, ["keys", "create", "--name", "cli", "--rate-per-min", "9",
                                "--model", "gpt", "--monthly-cap", "2.5"])  # fmt: skip
    assert created.exit_code == 0, created.output
    body = orjson.loads(created.output)
    key_id = body["record"]["id"]
    assert body["key"].startswith("sk-gw-")
    assert (body["record"]["rate_per_min"], body["record"]["allowed_models"]) == (9, ["gpt"])

    listed = run.invoke(main, ["keys", "list"])
    assert key_id in listed.output and "active" in listed.output
    shown = orjson.loads(run.invoke(main, ["keys", "show", key_id]).output)
    assert shown["monthly_cap"] == 2.5
    assert run.invoke(main, ["keys", "revoke", key_id]).exit_code == 0
    assert "revoked" in run.invoke(main, ["keys", "list"]).output


def test_keys_create_quiet_prints_only_the_key(run: CliRunner) -> None:
    result = run.invoke(main, ["keys", "create", "--name", "q", "-q"])
    assert result.output.strip().startswith("sk-gw-")
    assert len(result.output.strip().splitlines()) == 1


def test_prices_show_and_set(run: CliRunner) -> None:
    assert "gpt" in orjson.loads(run.invoke(main, ["prices"]).output)["prices"]
    result = run.invoke(main, ["prices", "gpt", "--output-per-1k", "0.5"])
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.output) == {"model": "gpt", "input_per_1k": 0.001,
                                           "output_per_1k": 0.5}  # fmt: skip


def test_usage_lists_records(run: CliRunner, mint: Any, gateway_url: str) -> None:
    key, key_id = mint()
    httpx.post(
        gateway_url + "/v1/chat/completions",
        json={"model": "gpt", "messages": [{"role": "user", "content": "billed"}]},
        headers={"authorization": f"Bearer {key}"},
    )
    result = run.invoke(main, ["usage", "--key", key_id, "--limit", "5"])
    assert result.exit_code == 0
    records = orjson.loads(result.output)["records"]
    assert [(r["key_id"], r["model"], r["cached"]) for r in records] == [(key_id, "gpt", False)]


def test_errors_are_reported_not_raised(run: CliRunner) -> None:
    result = run.invoke(main, ["keys", "show", "0123456789abcdef"])
    assert result.exit_code == 1
    assert "404" in result.output


def test_admin_key_from_data_dir(
    run: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, admin_key: str
) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_KEY")
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(tmp_path))
    assert "no admin key" in run.invoke(main, ["keys", "list"]).output
    (tmp_path / "admin-key").write_text(admin_key + "\n")
    assert run.invoke(main, ["keys", "list"]).exit_code == 0


def test_unreachable_gateway_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", "x")
    result = CliRunner().invoke(main, ["keys", "list"])
    assert result.exit_code == 1
    assert "cannot reach the gateway" in result.output


def test_prompts_commands(run: CliRunner, tmp_path: Path) -> None:
    template = tmp_path / "greeting.txt"
    template.write_text("Hello {{ who }}")
    pushed = run.invoke(main, ["prompts", "push", "greeting", str(template)])
    assert pushed.exit_code == 0, pushed.output
    assert orjson.loads(pushed.output)["version"] == 1
    template.write_text("Hi {{ who }}")
    run.invoke(main, ["prompts", "push", "greeting", str(template)])
    assert "active v1  latest v2" in run.invoke(main, ["prompts", "list"]).output
    assert run.invoke(main, ["prompts", "activate", "greeting", "2"]).exit_code == 0
    rendered = run.invoke(main, ["prompts", "render", "greeting", "--var", "who=Ada"])
    assert rendered.output.strip() == "Hi Ada"
    shown = orjson.loads(run.invoke(main, ["prompts", "show", "greeting"]).output)
    assert shown["active"] == 2
    bad = run.invoke(main, ["prompts", "render", "greeting", "--var", "novalue"])
    assert bad.exit_code == 2 and "NAME=VALUE" in bad.output


def test_price_flags_need_a_model(run: CliRunner) -> None:
    result = run.invoke(main, ["prices", "--input-per-1k", "1"])
    assert result.exit_code == 2
    assert "MODEL" in result.output


def test_keys_list_shows_spend_against_caps(run: CliRunner, mint: Any, gateway_url: str) -> None:
    key, key_id = mint(monthly_cap=2, hard_cap=4)
    httpx.post(
        gateway_url + "/v1/chat/completions",
        json={"model": "gpt", "messages": [{"role": "user", "content": "spend"}]},
        headers={"authorization": f"Bearer {key}"},
    )
    line = next(li for li in run.invoke(main, ["keys", "list"]).output.splitlines() if key_id in li)
    assert "/$2.00 (0%)" in line and "/$4.00 (0%)" in line


def test_keys_list_shows_a_cap_below_a_cent_in_full(run: CliRunner, mint: Any) -> None:
    _, key_id = mint(hard_cap=0.00002)
    line = next(li for li in run.invoke(main, ["keys", "list"]).output.splitlines() if key_id in li)
    assert "/$0.00002 (0%)" in line


def write_usage(redis_server: RedisServer, key_id: str, seconds: list[int]) -> None:
    """Usage records at chosen times (Unix seconds); each costs its time in nano-USD."""
    client = redis_server.client()
    for at in seconds:
        fields = {"cost": at, "model": "gpt", "provider": "openai", "input_tokens": 3,
                  "output_tokens": 4, "cached": 0, "request_id": f"at-{at}"}  # fmt: skip
        client.xadd(Slots.of(key_id).usage, fields, id=f"{at * 1000}-0")


def test_usage_export_walks_one_key_at_a_time(
    run: CliRunner, mint: Any, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = sorted(mint()[1] for _ in range(2))
    write_usage(redis_server, first, [1000, 3000])
    write_usage(redis_server, second, [2000])
    asked: list[dict[str, Any]] = []
    request = httpx.request

    def spy(method: str, url: str, **kwargs: Any) -> httpx.Response:
        if url.endswith("/usage"):
            asked.append(kwargs["params"])
        return request(method, url, **kwargs)

    monkeypatch.setattr(httpx, "request", spy)
    result = run.invoke(main, ["usage", "export"])
    assert result.exit_code == 0, result.output
    rows = [orjson.loads(line) for line in result.output.splitlines()]
    # By key, then newest first: not merged by time across keys.
    assert [(r["key_id"], r["request_id"]) for r in rows] == [
        (first, "at-3000"), (first, "at-1000"), (second, "at-2000"),
    ]  # fmt: skip
    assert [params["key"] for params in asked] == [first, second]

    period = run.invoke(main, ["usage", "export", "--since", "1500", "--until", "2500"])
    assert [orjson.loads(line)["request_id"] for line in period.output.splitlines()] == ["at-2000"]


def test_usage_export_csv_for_one_key_and_period(
    run: CliRunner, mint: Any, redis_server: RedisServer
) -> None:
    (_, mine), (_, other) = mint(), mint()
    write_usage(redis_server, mine, [1000, 2000, 3000, 4000])
    write_usage(redis_server, other, [2500])
    result = run.invoke(main, ["usage", "export", "--format", "csv", "--key", mine,
                               "--since", "2000", "--until", "1970-01-01T00:50:00Z"])  # fmt: skip
    assert result.exit_code == 0, result.output
    reader = csv.DictReader(io.StringIO(result.output))
    rows = list(reader)
    assert reader.fieldnames == list(EXPORT_FIELDS)
    assert [(r["key_id"], r["at"], r["cost_nano"], r["cached"]) for r in rows] == [
        (mine, "1970-01-01T00:50:00Z", "3000", "False"),
        (mine, "1970-01-01T00:33:20Z", "2000", "False"),
    ]  # fmt: skip


def test_usage_export_csv_totals_equal_the_keys_spend(
    run: CliRunner, mint: Any, gateway_url: str, redis_server: RedisServer
) -> None:
    key, key_id = mint()
    chat_each(gateway_url, key, ["one", "two two", "three three three"])
    result = run.invoke(main, ["usage", "export", "--format", "csv", "--key", key_id])
    rows = list(csv.DictReader(io.StringIO(result.output)))
    spend = int(redis_server.client().hget(Slots.of(key_id).spend, "total") or 0)
    assert len(rows) == 3 and spend > 0
    assert sum(int(r["cost_nano"]) for r in rows) == spend
