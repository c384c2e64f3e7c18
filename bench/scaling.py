"""Throughput with 1, 2 and 3 replicas behind nginx, on one Redis and on a 3-shard cluster.

    .venv/bin/python bench/scaling.py [--requests 6000] [--concurrency 64] [--workers 2]

Each setup runs `gateway serve --workers N` replicas (the built-in `mock` provider, so no
upstream is involved), nginx from deploy/nginx.conf in front, and drives `--requests`
completions through nginx at `--concurrency`, spread over 50 keys with no limits. It
prints requests per second per setup. On a machine with few cores the load generator,
nginx, Redis and every worker share them: the curve flattens once the cores are busy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import write_config
from tests.servers import GatewayProcess, Nginx, RedisClusterServers, RedisServer

ADMIN = "bench-admin"
CONFIG = {
    "providers": {"mock": {"type": "mock"}},
    "models": {
        "mock-echo": {
            "input_per_1k": 0.001, "output_per_1k": 0.002,
            "routes": [{"provider": "mock", "model": "mock-echo"}],
        }
    },
    "cache": {"enabled": False},
}  # fmt: skip


async def drive(url: str, keys: list[str], requests: int, concurrency: int) -> tuple[float, int]:
    """(requests per second, errors) for `requests` completions at `concurrency`."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                i = queue.get_nowait()
                body = {"model": "mock-echo", "messages": [{"role": "user", "content": f"q{i}"}]}
                headers = {"authorization": f"Bearer {keys[i % len(keys)]}"}
                async with http.post(
                    url + "/v1/chat/completions", json=body, headers=headers
                ) as response:
                    await response.read()
                    errors += response.status != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started), errors


def measure(store_url: str, replicas: int, workers: int, args: argparse.Namespace) -> float:
    folder = Path(tempfile.mkdtemp(prefix="gw-scaling-"))
    config = write_config(folder / "gateway.yaml", CONFIG)
    env = {"GATEWAY_REDIS_URL": store_url, "GATEWAY_ADMIN_KEY": ADMIN,
           "GATEWAY_LOG_LEVEL": "WARNING"}  # fmt: skip
    processes = [GatewayProcess(config, env, workers=workers).launch() for _ in range(replicas)]
    for process in processes:
        process.wait_ready()
    balancer = Nginx(folder / "nginx", [f"127.0.0.1:{p.port}" for p in processes]).start()
    try:
        headers = {"authorization": f"Bearer {ADMIN}"}
        keys = [
            httpx.post(balancer.url + "/api/ai-gateway/keys", json={"name": f"k{i}"},
                       headers=headers).json()["key"]
            for i in range(50)
        ]  # fmt: skip
        asyncio.run(drive(balancer.url, keys, 500, args.concurrency))  # warm up
        rate, errors = asyncio.run(drive(balancer.url, keys, args.requests, args.concurrency))
        if errors:
            print(f"  ({errors} requests failed)")
        return rate
    finally:
        balancer.stop()
        for process in processes:
            process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.requests} requests at concurrency {args.concurrency}")
    print(f"{'store':8} {'replicas':>8} {'workers':>8} {'req/s':>8}")
    single = RedisServer().start()
    try:
        for replicas in (1, 2, 3):
            single.client().flushall()
            rate = measure(single.url, replicas, args.workers, args)
            print(f"{'single':8} {replicas:8} {args.workers:8} {rate:8.0f}", flush=True)
    finally:
        single.stop()
    cluster = RedisClusterServers(3).start()
    try:
        rate = measure(cluster.url, 3, args.workers, args)
        print(f"{'cluster':8} {3:8} {args.workers:8} {rate:8.0f}", flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
