"""Measure what a Sentinel failover loses, with and without `store.wait_replicas`.

    python bench/failover.py [--requests 400] [--rounds 5]

Each round starts a master, a replica and three sentinels, drives `--requests`
concurrent completions through one gateway, SIGKILLs the master while they are in flight
(once a third have been answered), waits for the promotion, and counts the usage records
that survived on the new master against the requests answered 200: a request the client
saw succeed whose charge did not survive is lost money. It also times the outage: from the
kill to the first 200 after it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import config as config_module
from gateway.app import create_app
from tests.conftest import config_dict
from tests.servers import SentinelGroup, ThreadServer
from tests.test_admission import burst
from tests.upstreams import openai_upstream

ADMIN = "bench-admin"


async def one_round(requests: int, wait_replicas: int) -> tuple[int, int, float]:
    """(answered 200, records that survived, outage seconds)."""
    group = SentinelGroup().start()
    upstream = openai_upstream()
    raw = config_dict(
        {"openai": upstream, "claude": upstream},
        store={"wait_replicas": wait_replicas, "wait_timeout_ms": 1000},
    )
    server = ThreadServer(create_app(config_module.parse(raw, "bench"), group.url)).start()
    try:
        headers = {"authorization": f"Bearer {ADMIN}"}
        created = httpx.post(
            server.url + "/api/ai-gateway/keys", json={"name": "f"}, headers=headers
        ).json()
        flight = asyncio.create_task(burst(server.url, created["key"], requests))
        usage = f"gw:{{{created['record']['id']}}}:usage"
        while group.master.client().xlen(usage) < requests // 3:
            await asyncio.sleep(0.001)
        group.master.kill()
        killed = time.monotonic()
        statuses = await flight
        while True:
            if await burst(server.url, created["key"], 1) == [200]:
                break
            await asyncio.sleep(0.05)
        outage = time.monotonic() - killed
        survived = group.replica.client().xlen(usage)
        return statuses.count(200), survived - 1, outage  # minus the probe that got through
    finally:
        server.stop()
        upstream.stop()
        group.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import os

    os.environ["GATEWAY_ADMIN_KEY"] = ADMIN
    os.environ["OPENAI_STANDIN_KEY"] = "sk-bench"
    print("wait_replicas  answered  survived  lost  outage_s")
    for wait_replicas in (0, 1):
        for _ in range(args.rounds):
            answered, survived, outage = await one_round(args.requests, wait_replicas)
            lost = answered - survived
            print(f"{wait_replicas:13}  {answered:8}  {survived:8}  {lost:4}  {outage:8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
