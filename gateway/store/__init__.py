"""The seam in front of Redis: connection from a URL, the Lua scripts, error mapping.

Every Redis call of the gateway goes through `Store.call` or `Store.run`, which turn
connection failures into `StoreUnavailable` (503); nothing above this module sees a
redis-py exception. Scripts on a single server run over `Wire` (the hot path's
pipelined connection); everything else, and every script on a Cluster or behind
Sentinel, goes through redis-py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.commands.core import AsyncScript

from gateway.errors import StoreUnavailable
from gateway.store.topology import POOL_SIZE, connect
from gateway.store.wire import TICKS_PER_DEADLINE, Unreachable, Wire

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures that say nothing ran, or may have, and that pass: a lost or stuck connection,
# and the error replies of a server that refuses commands for now (loading, a replica,
# out of memory, its primary down, a cluster resharding or down). A 503 for the client;
# a settlement retries them (every script is keyed by its request id).
_UNAVAILABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.ReadOnlyError,
    rexc.OutOfMemoryError,
    rexc.MasterDownError,
    rexc.TryAgainError,
    rexc.ClusterDownError,
    OSError,
)
# What redis-py lets escape when a connection is torn down under it mid-handshake (the
# transport raises RuntimeError, a dropped writer AttributeError). Only client calls run
# inside Store.call, so these mean a lost connection, not a bug of ours.
_TORN_DOWN = (RuntimeError, AttributeError)
SLOT_WAIT_SECONDS = 5.0
COMMAND_SECONDS = 5.0  # one store operation, resends included
TORN_DOWN_ATTEMPTS = 4
TORN_DOWN_PAUSE_SECONDS = 0.02
SCRIPTS = ("admit_request", "settle_request", "add_prompt_version")


def lua_dir() -> Path:
    """The scripts ship inside the wheel as gateway/lua; a source checkout has them at ./lua."""
    packaged = Path(__file__).resolve().parent.parent / "lua"
    return packaged if packaged.is_dir() else packaged.parent.parent / "lua"


def load_script(name: str) -> str:
    folder = lua_dir()
    prelude = (folder / "_calendar.lua").read_text(encoding="utf-8")
    return prelude + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8")


class Store:
    def __init__(self, url: str, *, wait_replicas: int = 0, wait_timeout_ms: int = 100) -> None:
        self.url = url
        # Each client's pool holds POOL_SIZE connections; never run more operations than
        # that at once, so a burst queues here instead of exhausting the pool.
        self._slots = asyncio.Semaphore(POOL_SIZE)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        # Typed as a plain client: RedisCluster offers the same commands.
        self.redis: aioredis.Redis = connect(url)
        self.binary: aioredis.Redis = connect(url, decode=False)  # msgpack cache entries
        # Scripts answer through the binary client: admission can return a cache entry.
        self.scripts: dict[str, AsyncScript] = {
            name: self.binary.register_script(load_script(name)) for name in SCRIPTS
        }
        # A write waits up to wait_timeout_ms for its replicas on top of its own time.
        self.deadline = COMMAND_SECONDS + (wait_timeout_ms / 1000 if wait_replicas else 0)
        self.wire = Wire(url, self.deadline) if Wire.serves(url) else None
        # The longest a command sent may go unanswered before its connection is dropped
        # (the wire's watchdog ticks a few times per deadline; redis-py's is one timer).
        self.in_flight_seconds = (
            self.deadline * (1 + 1 / TICKS_PER_DEADLINE) if self.wire else self.deadline
        )

    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA a script by name; after NOSCRIPT, EVAL it (which loads it again)."""
        script = self.scripts[name]
        if self.wire is not None:
            return await self._run_wired(self.wire, script, keys, args)
        if self.wait_replicas:
            return await self.call(lambda: self._run_replicated(script, keys, args))
        return await self.call(lambda: self._run_plain(script, keys, args))

    async def _run_plain(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.binary.evalsha(script.sha, len(keys), *keys, *args)
        except rexc.NoScriptError:
            return await self.binary.eval(cast(str, script.script), len(keys), *keys, *args)

    async def _run_wired(
        self, wire: Wire, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> Any:
        """EVALSHA (then WAIT, when replicas must have the write) in one round trip. No
        connection slot is taken, as the wire has no pool to exhaust, and no timer: the
        wire fails a call its connection leaves unanswered past the deadline. A server
        without the script (restarted, or SCRIPT FLUSH) gets it whole with EVAL, which
        no flush can race as a SCRIPT LOAD then EVALSHA could."""
        waiting = [("WAIT", self.wait_replicas, self.wait_timeout_ms)] if self.wait_replicas else []
        try:
            answer, *acked = await wire.execute(
                ("EVALSHA", script.sha, len(keys), *keys, *args), *waiting
            )
            if isinstance(answer, rexc.NoScriptError):
                answer, *acked = await wire.execute(
                    ("EVAL", script.script, len(keys), *keys, *args), *waiting
                )
            if isinstance(answer, Exception):
                raise answer
        except (rexc.RedisError, OSError) as exc:
            if _passes(exc):
                raise _unavailable(exc) from exc
            raise
        self._check_replicas(acked[0] if acked else None)
        return answer

    def _check_replicas(self, acked: Any) -> None:
        if isinstance(acked, int) and acked < self.wait_replicas:
            log.warning("a write reached %d of %d replicas in time", acked, self.wait_replicas)

    async def _run_replicated(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA then WAIT in one round trip: the answer comes once replicas have the
        write. After NOSCRIPT, EVAL (as on the wire)."""
        for command, body in (("EVALSHA", script.sha), ("EVAL", script.script)):
            async with self.binary.pipeline(transaction=False) as pipe:
                pipe.execute_command(command, body, len(keys), *keys, *args)
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
                answer, acked = await pipe.execute(raise_on_error=False)
            if not isinstance(answer, rexc.NoScriptError):
                break
        if isinstance(answer, Exception):
            raise answer
        self._check_replicas(acked)
        return answer

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation, waiting for a free connection slot first.

        The operation gets the store's deadline in all: one timer here, instead of
        redis-py's per-command socket timeouts (a task and a timer per command).
        """
        if self._slots.locked():
            try:
                async with asyncio.timeout(SLOT_WAIT_SECONDS):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise StoreUnavailable(
                    "the store is saturated: no free connection in time"
                ) from exc
        else:
            await self._slots.acquire()  # a free slot: taken at once, no timer needed
        try:
            async with asyncio.timeout(self.deadline):
                return await self._resending(operation)
        except (*_UNAVAILABLE, *_TORN_DOWN) as exc:  # TimeoutError is an OSError
            raise _unavailable(exc) from exc
        except rexc.ResponseError as exc:
            if _passes(exc):
                raise _unavailable(exc) from exc
            raise
        finally:
            self._slots.release()

    async def _resending(self, operation: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, TORN_DOWN_ATTEMPTS):
            try:
                return await operation()
            except _TORN_DOWN:
                # A connection torn down mid-handshake under a burst (the cluster client
                # closes a node's connections while others still open): the command never
                # ran or is idempotent (see topology._RETRY), so resend on a fresh
                # connection after a pause that lets the burst pass.
                await asyncio.sleep(TORN_DOWN_PAUSE_SECONDS * attempt)
        return await operation()

    async def ready(self) -> bool:
        """The store answers and every script is loaded on it."""
        try:
            async with asyncio.timeout(COMMAND_SECONDS):
                return await self._load_scripts()
        except (*_UNAVAILABLE, rexc.ResponseError):
            return False

    async def _load_scripts(self) -> bool:
        await self.redis.ping()
        shas = [script.sha for script in self.scripts.values()]
        loaded = await self.redis.script_exists(*shas)
        for script, present in zip(self.scripts.values(), loaded, strict=True):
            if not present:
                await self.redis.script_load(script.script)
        return True

    async def warn_if_evicting(self) -> None:
        try:
            async with asyncio.timeout(COMMAND_SECONDS):
                answer = await self.redis.config_get("maxmemory-policy")
            policy = answer["maxmemory-policy"]
        except (*_UNAVAILABLE, rexc.ResponseError, KeyError):
            return
        if policy and policy != "noeviction":
            log.warning(
                "the store runs with maxmemory-policy %s: spend and reservations may be "
                "evicted; set it to noeviction",
                policy,
            )

    async def month(self) -> str:
        """The current calendar month, UTC, by the store's clock: "YYYY-MM"."""
        seconds, _ = await self.call(self.redis.time)
        return time.strftime("%Y-%m", time.gmtime(seconds))

    async def close(self) -> None:
        if self.wire is not None:
            await self.wire.aclose()
        await self.redis.aclose()
        await self.binary.aclose()


def _unavailable(exc: BaseException) -> StoreUnavailable:
    cause = (exc.__cause__ or exc) if isinstance(exc, Unreachable) else exc
    unavailable = StoreUnavailable(f"the store is unavailable: {cause.__class__.__name__}")
    unavailable.may_have_run = not isinstance(exc, Unreachable)
    return unavailable


def _passes(exc: BaseException) -> bool:
    """A failure that passes (a 503), not a bug of ours or a damaged key, which retrying
    would not mend. BUSY (another client's script running past its time limit, refusing
    every command until it ends or is killed) has no class of its own in redis-py."""
    return isinstance(exc, _UNAVAILABLE) or str(exc).startswith("BUSY ")
