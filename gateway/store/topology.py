"""Clients for each Redis topology, chosen by the URL scheme.

    redis://host:6379/0, rediss://..., unix:///path.sock     one server
    redis+cluster://host:7000[,host:7001]                      Redis Cluster (rediss+cluster: TLS)
    redis+sentinel://[:password@]host:26379[,host2:26379]/mymaster[/db]
                                                               the master Sentinel names

Single servers and Sentinel masters use a blocking pool: under a burst, a request waits
up to `POOL_WAIT_SECONDS` for a free connection instead of failing. (A cluster client
keeps a pool per node, sized for the burst, since redis-py has no blocking variant.)

Every Redis key one script touches carries the same {hash tag}, so each script runs on
one cluster shard; redis-py routes it by its keys and reloads a script on the node that
answers NOSCRIPT.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

POOL_SIZE = 256
POOL_WAIT_SECONDS = 5.0
CLUSTER_POOL_SIZE_PER_NODE = 2048
OPTIONS: dict[str, Any] = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 30,
}


def connect(url: str, *, decode: bool = True) -> Any:
    """A pooled asyncio client for `url`: Redis, RedisCluster or a Sentinel-managed master."""
    scheme = url.partition("://")[0]
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster(url, decode)
    if scheme == "redis+sentinel":
        return _sentinel(url, decode)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=decode,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_SECONDS,
        **OPTIONS,
    )
    return aioredis.Redis.from_pool(pool)


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
        max_connections=CLUSTER_POOL_SIZE_PER_NODE,
        **{**OPTIONS, **options},
    )


def _sentinel(url: str, decode: bool) -> aioredis.Redis:
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a redis+sentinel:// URL names the master: .../mymaster")
    service, db = path[0], int(path[1]) if len(path) > 1 else 0
    password = unquote(parts.password) if parts.password else None
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        _hosts(parts.netloc, 26379),
        sentinel_kwargs={"socket_timeout": 1.0, "socket_connect_timeout": 1.0},
        password=password,
        db=db,
        decode_responses=decode,
        **OPTIONS,
    )
    return sentinel.master_for(  # type: ignore[no-any-return]
        service,
        connection_pool_class=BlockingSentinelPool,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_SECONDS,
    )


class BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The Sentinel-managed pool, waiting for a free connection like BlockingConnectionPool."""
