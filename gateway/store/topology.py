"""Clients for each Redis topology, chosen by the URL scheme.

    redis://host:6379/0, rediss://..., unix:///path.sock     one server
    redis+cluster://host:7000[,host:7001]                      Redis Cluster (rediss+cluster: TLS)
    redis+sentinel://[:password@]host:26379[,host2:26379]/mymaster[/db]
                                                               the master Sentinel names

Pools are sized to `POOL_SIZE`; `Store` lets no more operations than that run at once,
so a burst waits for a free connection instead of opening thousands (or failing).

Every Redis key one script touches carries the same {hash tag}, so each script runs on
one cluster shard; redis-py routes it by its keys and reloads a script on the node that
answers NOSCRIPT.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

POOL_SIZE = 64  # operations in flight per client per worker process
_HEADROOM = 8  # connections outside Store's gate: the price book's subscription
# A pooled connection left dead by a Redis restart or failover fails its next command
# once; reconnect and resend. Every script the gateway runs is idempotent (keyed by its
# reservation id) and every other command is a read or an overwrite, so a resend is safe.
_RETRY: dict[str, Any] = {
    "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
    "retry_on_error": [rexc.ConnectionError],
}
OPTIONS: dict[str, Any] = {
    # No per-command socket timeout: redis-py spends a task and a timer on it per command.
    # `Store` bounds each whole operation instead (COMMAND_SECONDS), and redis-py drops a
    # connection whose read was cut short.
    "socket_timeout": None,
    # Generous: under a burst the event loop itself can lag by seconds, and a connect that
    # "times out" after the server accepted it leaves a half-closed connection behind.
    "socket_connect_timeout": 10.0,
    "health_check_interval": 30,
}


def connect(url: str, *, decode: bool = True) -> Any:
    """A pooled asyncio client for `url`: Redis, RedisCluster or a Sentinel-managed master."""
    scheme = url.partition("://")[0]
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster(url, decode)
    if scheme == "redis+sentinel":
        return _sentinel(url, decode)
    return aioredis.Redis.from_url(
        url, decode_responses=decode, max_connections=POOL_SIZE + _HEADROOM, **OPTIONS, **_RETRY
    )


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        hosts.append((host or "127.0.0.1", int(port or default_port)))
    return hosts


def _cluster(url: str, decode: bool) -> RedisCluster:
    parts = urlsplit(url)
    nodes = [ClusterNode(host, port) for host, port in _hosts(parts.netloc, 6379)]
    options = dict(parse_qsl(parts.query))
    return RedisCluster(
        startup_nodes=nodes,
        decode_responses=decode,
        ssl=parts.scheme.startswith("rediss"),
        password=unquote(parts.password) if parts.password else None,
        max_connections=POOL_SIZE + _HEADROOM,
        **{**OPTIONS, **options},
    )


def _sentinel(url: str, decode: bool) -> aioredis.Redis:
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a redis+sentinel:// URL names the master: .../mymaster")
    service, db = path[0], int(path[1]) if len(path) > 1 else 0
    password = unquote(parts.password) if parts.password else None
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2 on
        _hosts(parts.netloc, 26379),
        **_RETRY,
        sentinel_kwargs={"socket_timeout": 1.0, "socket_connect_timeout": 1.0},
        password=password,
        db=db,
        decode_responses=decode,
        **OPTIONS,
    )
    return sentinel.master_for(  # type: ignore[no-any-return]
        service, max_connections=POOL_SIZE + _HEADROOM
    )
