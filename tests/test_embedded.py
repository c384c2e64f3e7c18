"""`gateway serve` on the embedded default: a private store that keeps keys and spend."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import GatewayProcess

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("GATEWAY_REDIS_URL", "GATEWAY_ADMIN_KEY", "GATEWAY_CONFIG", "GATEWAY_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    yield


def serve(cwd: Path) -> GatewayProcess:
    return GatewayProcess(None, {}, workers=2, cwd=cwd).start()


def test_embedded_store_first_start_and_restart(tmp_path: Path, clean_env: None) -> None:
    gateway = serve(tmp_path)
    admin_file = tmp_path / "gateway-data" / "admin-key"
    admin_key = admin_file.read_text().strip()
    assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600

    headers = {"authorization": f"Bearer {admin_key}"}
    created = httpx.post(
        gateway.url + "/api/ai-gateway/keys", json={"name": "embedded"}, headers=headers
    ).json()
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=created["key"], max_retries=0)
    done = client.chat.completions.create(
        model="mock-echo", messages=[{"role": "user", "content": "hello embedded"}]
    )
    assert done.choices[0].message.content == "echo: hello embedded"
    spend = httpx.get(
        gateway.url + f"/api/ai-gateway/keys/{created['record']['id']}", headers=headers
    ).json()["spend"]
    assert spend > 0
    log = gateway.stop()
    assert "admin-key" in log and admin_key not in log
    assert not (tmp_path / "gateway-data" / "store.sock").exists()

    again = serve(tmp_path)
    try:
        assert admin_file.read_text().strip() == admin_key
        record = httpx.get(
            again.url + f"/api/ai-gateway/keys/{created['record']['id']}", headers=headers
        ).json()
        assert record["spend"] == spend
        again_client = openai.OpenAI(
            base_url=again.url + "/v1", api_key=created["key"], max_retries=0
        )
        assert again_client.models.list().data[0].id == "mock-echo"
    finally:
        again.stop()


def test_embedded_store_dies_with_the_gateway(tmp_path: Path, clean_env: None) -> None:
    gateway = serve(tmp_path)
    pid_of_store = _store_pids(tmp_path)
    assert pid_of_store
    gateway.stop()
    assert all(not _alive(pid) for pid in pid_of_store)


def _store_pids(data_root: Path) -> list[int]:
    marker = str(data_root / "gateway-data")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "server" in cmdline and marker in cmdline:
                pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
