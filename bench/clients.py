"""What an upstream call costs the client alone: httpx (as the gateway sets it up) vs aiohttp.

    .venv/bin/python bench/clients.py [--requests 3000]

Starts the bench's nginx upstream, then, in this one process pinned to the last core
(nginx gets the others), POSTs the same chat body with each client at c=1, 16 and 64 and
prints the CPU time this process spent per request. No gateway, no Redis: only the
client library, which is the larger half of a gateway worker's time (see README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs, services

BODY = b'{"model":"gpt-bench","messages":[{"role":"user","content":"hello"}],"max_tokens":64}'
HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
# The gateway's own pool limits (gateway/providers/base.py).
GATEWAY_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=200)


def cpu() -> float:
    return sum(os.times()[:2])


async def cost(call: Callable[[], Awaitable[None]], concurrency: int, requests: int) -> float:
    """CPU microseconds per request of `call`, run `requests` times `concurrency` at a time."""

    async def worker(count: int) -> None:
        for _ in range(count):
            await call()

    await asyncio.gather(*(worker(20) for _ in range(concurrency)))  # connect, warm up
    started = cpu()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return (cpu() - started) / requests * 1e6


async def compare(url: str, requests: int) -> None:
    print("concurrency  httpx us/req  aiohttp us/req  (CPU of the client process)")
    for concurrency in (1, 16, 64):
        async with httpx.AsyncClient(limits=GATEWAY_LIMITS) as client:

            async def with_httpx() -> None:
                response = await client.post(url, content=BODY, headers=HEADERS)
                response.raise_for_status()

            spent_httpx = await cost(with_httpx, concurrency, requests)
        connector = aiohttp.TCPConnector(limit=1000)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def with_aiohttp() -> None:
                async with session.post(url, data=BODY, headers=HEADERS) as response:
                    await response.read()
                    response.raise_for_status()

            spent_aiohttp = await cost(with_aiohttp, concurrency, requests)
        print(f"{concurrency:11}  {spent_httpx:12.0f}  {spent_aiohttp:14.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-clients-"))
    run = procs.Processes(workdir)
    last = procs.CPU_COUNT - 1
    try:
        upstream = services.start_nginx(run, f"0-{last - 1}" if last else None)
        if last:
            os.sched_setaffinity(0, {last})
        time.sleep(0.2)
        uvloop.run(compare(upstream.base_url(services.PLAIN) + "/chat/completions", args.requests))
    finally:
        run.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
