"""Starting the servers of a run: Redis, the nginx upstream, the gateway, LiteLLM's proxy."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from bench import procs, upstream

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADMIN_KEY = "bench-admin-key"
UPSTREAM_KEY = "sk-upstream-bench"
LITELLM_KEY = "sk-litellm-bench"
LITELLM_VENV = ROOT / "bench" / ".litellm-venv"
PLAIN, STREAM = "bench-plain", "bench-stream"
PRICE = {"input_per_1k": "0.00015", "output_per_1k": "0.0006", "max_output_tokens": 4096}


@dataclass
class Upstream:
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_url(self, model: str) -> str:
        return f"{self.url}/{'stream' if model == STREAM else 'plain'}/v1"


@dataclass
class Gateway:
    port: int
    pid: int
    workers: int
    key: str = ""
    worker_pids: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_redis(run: procs.Processes, cpus: str | None) -> redis.Redis:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is missing: apt-get install -y redis-server")
    port = procs.free_port()
    command = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(run.workdir), "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    run.start("redis", procs.pinned(command, cpus))
    client = redis.Redis(port=port, decode_responses=True)
    procs.wait_until(lambda: bool(client.ping()), "redis-server")
    return client


def start_nginx(run: procs.Processes, cpus: str | None) -> Upstream:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is missing: apt-get install -y nginx")
    port = procs.free_port()
    conf = run.workdir / "nginx.conf"
    conf.write_text(upstream.nginx_conf(port, run.workdir))
    run.start("nginx", procs.pinned([binary, "-c", str(conf), "-e", "stderr"], cpus))
    procs.wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").is_success, "nginx")
    return Upstream(port)


def gateway_config(up: Upstream) -> dict[str, Any]:
    providers = {
        name: {
            "type": "openai",
            "base_url": up.base_url(model),
            "api_key_env": "BENCH_UPSTREAM_KEY",
        }
        for name, model in (("plain", PLAIN), ("stream", STREAM))
    }
    models = {
        model: {**PRICE, "routes": [{"provider": name, "model": upstream.MODEL}]}
        for name, model in (("plain", PLAIN), ("stream", STREAM))
    }
    return {"providers": providers, "models": models, "cache": {"ttl_seconds": 3600}}


def start_gateway(
    run: procs.Processes, up: Upstream, redis_port: int, workers: int, cpus: str | None
) -> Gateway:
    config = run.workdir / "gateway.yaml"
    config.write_text(yaml.safe_dump(gateway_config(up)))
    env = {
        **os.environ,
        "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_DATA_DIR": str(run.workdir / "gateway-data"),
        "GATEWAY_LOG_LEVEL": "WARNING",
        "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
    }
    port = procs.free_port()
    command = [str(BIN / "gateway"), "serve", "--port", str(port), "--workers", str(workers)]
    process = run.start(
        f"gateway-{workers}w", procs.pinned([*command, "--config", str(config)], cpus), env
    )
    gateway = Gateway(port, process.pid, workers)
    procs.wait_until(lambda: httpx.get(gateway.url + "/readyz").is_success, "the gateway")
    gateway.worker_pids = worker_pids(gateway)
    return gateway


def worker_pids(gateway: Gateway) -> list[int]:
    """The uvicorn worker processes: the server itself with one worker, else its workers."""
    if gateway.workers == 1:
        return [gateway.pid]
    procs.wait_until(lambda: len(_spawned(gateway.pid)) >= gateway.workers, "the gateway workers")
    return _spawned(gateway.pid)


def _spawned(pid: int) -> list[int]:
    return [c for c in procs.children(pid) if "spawn_main" in procs.cmdline(c)]


def mint_key(gateway: Gateway) -> str:
    """A key with no rate limit and a cap far out of reach, so every request is admitted."""
    body = {"name": "bench", "rate_per_min": 0, "hard_cap": 1_000_000, "monthly_cap": 0}
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    answer = httpx.post(gateway.url + "/api/ai-gateway/keys", json=body, headers=headers)
    answer.raise_for_status()
    return str(answer.json()["key"])


def litellm_binary() -> Path | None:
    binary = LITELLM_VENV / "bin" / "litellm"
    return binary if binary.exists() else None


def litellm_config(up: Upstream) -> dict[str, Any]:
    models = [
        {
            "model_name": model,
            "litellm_params": {
                "model": f"openai/{upstream.MODEL}",
                "api_base": up.base_url(model),
                "api_key": UPSTREAM_KEY,
            },
        }
        for model in (PLAIN, STREAM)
    ]
    return {
        "model_list": models,
        "general_settings": {"master_key": LITELLM_KEY},
        "litellm_settings": {"set_verbose": False, "json_logs": False},
    }


def start_litellm(run: procs.Processes, up: Upstream, cpus: str | None) -> Gateway:
    binary = litellm_binary()
    if binary is None:
        raise RuntimeError(f"LiteLLM is not installed in {LITELLM_VENV}")
    config = run.workdir / "litellm.yaml"
    config.write_text(json.dumps(litellm_config(up)))
    port = procs.free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_"))},
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_SCHEMA_UPDATE": "true",
    }
    command = [
        str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
        "--num_workers", "1",
    ]  # fmt: skip
    process = run.start("litellm", procs.pinned(command, cpus), env)
    proxy = Gateway(port, process.pid, 1, key=LITELLM_KEY)
    procs.wait_until(
        lambda: httpx.get(proxy.url + "/health/liveliness").is_success, "LiteLLM", timeout=180
    )
    proxy.worker_pids = [process.pid]
    return proxy
