"""Throughput as gateway replicas and Redis Cluster masters are added, all behind nginx.

    .venv/bin/python bench/scaling.py [--requests 20000] [--concurrency 64] [--workers 2]

Two series: 1, 2 and 3 replicas on one Redis, then 3 replicas on a cluster of 1, 2 and 3
masters (a one-master cluster holds all 16384 slots, so that series differs only in how
the slots are spread). Each replica is `gateway serve --workers N` with the built-in
`mock` provider, so no upstream is involved; nginx from deploy/nginx.conf is in front;
`--requests` completions go through nginx at `--concurrency`, spread over 50 keys with no
limits. For each setup it prints requests per second and the cores used on average during
the measured run: the whole machine's busy time, then the load generator (this process),
nginx, the gateway replicas (supervisors and workers), Redis, whatever else ran ("other":
a run where it is not near zero was disturbed) and the time the hypervisor took ("steal").
On a machine with few cores they all share them: the curve flattens once the cores are
busy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import redis

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


PARTS = ("busy", "loadgen", "nginx", "gateway", "redis", "other", "steal")


@dataclass
class Run:
    rate: float  # requests per second
    cores: dict[str, float]  # PARTS -> cores used on average during the run


def machine_seconds() -> tuple[float, float]:
    """CPU seconds since boot: the cores' busy time, and the time the hypervisor took from
    them (steal)."""
    with open("/proc/stat") as stat:
        user, nice, system, _, _, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def tree_seconds(roots: list[int]) -> float:
    """CPU seconds used so far by the live processes `roots` and all their descendants."""
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) "
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total, pending = 0.0, list(roots)
    while pending:
        pid = pending.pop()
        total += used.get(pid, 0.0)
        pending += children.get(pid, [])
    return total


def redis_seconds(nodes: list[redis.Redis]) -> float:
    return sum(
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        for cpu in (node.info("cpu") for node in nodes)
    )


def cpu_seconds(nginx: int, gateways: list[int], nodes: list[redis.Redis]) -> list[float]:
    """Seconds used so far, in PARTS order ("other" is what the named parts leave of "busy":
    processes outside the benchmark)."""
    busy, steal = machine_seconds()
    parts = [time.process_time(), tree_seconds([nginx]), tree_seconds(gateways),
             redis_seconds(nodes)]  # fmt: skip
    return [busy, *parts, busy - sum(parts), steal]


def measure(
    store_url: str, nodes: list[redis.Redis], replicas: int, args: argparse.Namespace
) -> Run:
    folder = Path(tempfile.mkdtemp(prefix="gw-scaling-"))
    config = write_config(folder / "gateway.yaml", CONFIG)
    env = {"GATEWAY_REDIS_URL": store_url, "GATEWAY_ADMIN_KEY": ADMIN,
           "GATEWAY_LOG_LEVEL": "WARNING"}  # fmt: skip
    workers = args.workers
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
        assert balancer.process is not None
        pids = (balancer.process.pid, [p.process.pid for p in processes if p.process], nodes)
        started, before = time.perf_counter(), cpu_seconds(*pids)
        rate, errors = asyncio.run(drive(balancer.url, keys, args.requests, args.concurrency))
        after, wall = cpu_seconds(*pids), time.perf_counter() - started
        if errors:
            print(f"  ({errors} requests failed)")
        used = {part: (b - a) / wall for part, a, b in zip(PARTS, before, after, strict=True)}
        return Run(rate, used)
    finally:
        balancer.stop()
        for process in processes:
            process.stop()


def report(store: str, masters: int, replicas: int, workers: int, run: Run) -> None:
    cores = "".join(f" {run.cores[part]:>7.2f}" for part in PARTS)
    print(f"{store:8} {masters:>7} {replicas:>8} {workers:>7} {run.rate:>7.0f}{cores}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.requests} requests at concurrency {args.concurrency}")
    print("cores used during the run: whole machine (busy) and each part of it")
    parts = "".join(f" {part:>7}" for part in PARTS)
    print(f"{'store':8} {'masters':>7} {'replicas':>8} {'workers':>7} {'req/s':>7}{parts}")
    single = RedisServer().start()
    try:
        for replicas in (1, 2, 3):
            single.client().flushall()
            run = measure(single.url, [single.client()], replicas, args)
            report("single", 1, replicas, args.workers, run)
    finally:
        single.stop()
    for masters in (1, 2, 3):
        cluster = RedisClusterServers(masters).start()
        try:
            run = measure(cluster.url, [n.client() for n in cluster.nodes], 3, args)
            report("cluster", masters, 3, args.workers, run)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
