"""`gateway serve` on the embedded default: a private store that keeps keys and spend."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import GatewayProcess, wait_until

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


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_cleanly(tmp_path: Path, clean_env: None, workers: int) -> None:
    """Exit status 0 after the graceful shutdown, the store stopped by the gateway (not
    left to die with it), no metrics folder left behind."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    gateway = GatewayProcess(None, {"TMPDIR": str(temp)}, workers=workers, cwd=tmp_path).start()
    assert [p.name[:16] for p in temp.iterdir()] == ["gateway-metrics-"]
    log = gateway.stop()
    assert gateway.process is not None and gateway.process.returncode == 0, log
    assert "gateway stopped" in log
    assert not _store_pids(tmp_path) and not (tmp_path / "gateway-data" / "store.sock").exists()
    assert list(temp.iterdir()) == []


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
    """Running, and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_second_gateway_on_the_same_data_dir_is_refused(tmp_path: Path, clean_env: None) -> None:
    first = serve(tmp_path)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--port", "0"],
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert second.returncode == 1
        assert "in use by the gateway with pid" in second.stderr
        assert "Traceback" not in second.stderr
        assert httpx.get(first.url + "/readyz").status_code == 200
        assert (tmp_path / "gateway-data" / "store.sock").exists()
    finally:
        first.stop()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        pytest.param({"GATEWAY_REDIS_URL": "garbage"}, "GATEWAY_REDIS_URL", id="redis-url"),
        pytest.param({"GATEWAY_CACHE_REDIS_URL": "ftp://x"}, "GATEWAY_CACHE_REDIS_URL",
                     id="cache-url"),
        pytest.param({"GATEWAY_DATA_DIR": "/proc/nope"}, "GATEWAY_DATA_DIR", id="data-dir"),
    ],
)  # fmt: skip
def test_bad_environment_is_one_clear_line(
    tmp_path: Path, clean_env: None, env: dict[str, str], named: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "0"],
        cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"Error: {named}" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigkilled_gateway_leaves_no_store_or_worker_behind(
    tmp_path: Path, clean_env: None
) -> None:
    gateway = serve(tmp_path)
    assert gateway.process is not None
    children = _children(gateway.process.pid)
    assert len(children) >= 3  # the store and two workers (and a resource tracker)
    gateway.process.kill()
    gateway.process.wait()
    wait_until(lambda: not any(_alive(pid) for pid in children), timeout=10)
    gateway.stop()  # collects the log and removes its temporary folder


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in found]
