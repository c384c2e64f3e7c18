"""A small async client for streamed completions: time to first byte and to last byte.

    python bench/streamclient.py URL --key K --model M --concurrency 16 --seconds 5 [--fixed]

`concurrency` tasks each send one request after another, on keep-alive connections, for
`seconds` (or until `--requests` are answered). TTFB is from sending the request to the
first body bytes (the first SSE event: headers alone do not count), TTLB to the end of
the body. A response that is not a 200
ending in `data: [DONE]` is counted as an error. Prints one JSON line.

wrk cannot time a first byte; this client can, and its own ceiling is shown by the
same rows against nginx directly, which it drives many times faster than the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import aiohttp

try:
    from uvloop import new_event_loop
except ImportError:  # the stock loop is slower, but correct
    new_event_loop = None  # type: ignore[assignment]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def body(model: str, text: str) -> bytes:
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": text},
    ]
    request = {"model": model, "max_tokens": 64, "messages": messages, "stream": True}
    return json.dumps(request, separators=(",", ":")).encode()


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.headers = {"authorization": f"Bearer {args.key}", "content-type": "application/json"}
        self.salt = uuid.uuid4().hex[:12]
        self.ttfb: list[float] = []
        self.ttlb: list[float] = []
        self.errors = 0
        self.hits = 0
        self.sent = 0  # requests started in the timed part
        self.counter = 0  # bodies made, never reset: no two unique bodies alike

    def next_body(self) -> bytes:
        self.sent += 1
        self.counter += 1
        text = "always the same" if self.args.fixed else f"{self.counter}"
        return body(self.args.model, f"bench {self.salt} question {text}")

    async def one(self, session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        async with session.post(self.args.url, data=self.next_body(), headers=self.headers) as r:
            first = await r.content.readany()
            first_at = time.perf_counter()
            last = first
            async for piece in r.content.iter_any():
                last = piece
            ended = time.perf_counter()
        if r.status != 200 or not last.rstrip().endswith(b"data: [DONE]"):
            self.errors += 1
            return
        self.hits += r.headers.get("x-gateway-cache") == "hit"
        self.ttfb.append(first_at - started)
        self.ttlb.append(ended - started)

    def more(self, until: float) -> bool:
        if self.args.requests:
            return self.sent < int(self.args.requests)
        return time.perf_counter() < until

    async def worker(self, session: aiohttp.ClientSession, until: float) -> None:
        while self.more(until):
            try:
                await self.one(session)
            except aiohttp.ClientError:
                self.errors += 1

    async def run(self) -> dict[str, Any]:
        connector = aiohttp.TCPConnector(limit=self.args.concurrency)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await self.one(session)  # connect (and prime a cache entry) before timing
            self.ttfb.clear()
            self.ttlb.clear()
            self.sent = self.hits = self.errors = 0
            started = time.perf_counter()
            until = started + self.args.seconds
            workers = [self.worker(session, until) for _ in range(self.args.concurrency)]
            await asyncio.gather(*workers)
            elapsed = time.perf_counter() - started
        return self.summary(elapsed)

    def summary(self, elapsed: float) -> dict[str, Any]:
        ms = [(name, [v * 1000 for v in values]) for name, values in
              (("ttfb", self.ttfb), ("ttlb", self.ttlb))]  # fmt: skip
        result: dict[str, Any] = {
            "requests": len(self.ttlb),
            "errors": self.errors,
            "cache_hits": self.hits,
            "rps": len(self.ttlb) / elapsed,
        }
        for name, values in ms:
            result[f"{name}_p50_ms"] = percentile(values, 50)
            result[f"{name}_p99_ms"] = percentile(values, 99)
        result["p50_ms"], result["p99_ms"] = result["ttlb_p50_ms"], result["ttlb_p99_ms"]
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=0, help="stop after this many")
    parser.add_argument("--fixed", action="store_true", help="one body: cache hits")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        print(json.dumps(runner.run(Client(args).run())))


if __name__ == "__main__":
    main()
