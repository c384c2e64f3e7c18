"""The `gateway` command against a running gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner

from gateway.cli import main

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
