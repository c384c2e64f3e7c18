"""The script calls of the hot path, on one pipelined connection per worker.

Through redis-py one EVALSHA runs about 450,000 instructions of Python (its pool, its
retry and observability wrappers, a packer in Python), a quarter of all a completion
costs, and a completion makes two. Here hiredis packs each command and parses each
reply, in C, and one connection carries every call in flight: Redis answers a
connection's commands in the order it reads them, so each reply goes to the oldest
caller still waiting, with no pool, lock, task or timer per call (about 100,000
instructions). One watchdog per connection, ticking a few times per deadline, fails
every call on it when the oldest has waited past the deadline: a timer per call would
cost more than the rest of the call's Python.

Only a single server takes this path (redis://, rediss://, unix://), reached with the
settings redis-py reads from the same URL: host or socket path, credentials, database
and TLS. Cluster and Sentinel stay on redis-py, which routes by slot and follows
failovers. Replies and failures come back as redis-py's exceptions, so `Store` maps them
to 503s the same way whichever path a call took.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from typing import Any, NamedTuple, cast

import hiredis
from redis import exceptions as rexc
from redis._parsers.base import BaseParser
from redis.asyncio.connection import SSLConnection
from redis.connection import parse_url

SINGLE_SERVER = ("redis", "rediss", "unix")
ATTEMPTS = 3  # a connection found dead is replaced, and its commands sent again
RESEND_PAUSE_SECONDS = 0.02
TICKS_PER_DEADLINE = 4  # a stuck call fails between 1 and 1.25 deadlines after it was sent


class Unreachable(rexc.ConnectionError):
    """None of a call reached the server's command loop, so none of it ran: no connection
    could be made, or the server turned it away at its client limit."""


def error_of(reply: hiredis.ReplyError) -> rexc.RedisError:
    """A Redis error reply as the exception redis-py raises for it, by redis-py's own
    table: the first word, and for some the whole message ("ERR max number of clients
    reached" is a ConnectionError, "OOM ..." an OutOfMemoryError)."""
    error = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return cast(rexc.RedisError, error)


class Wire:
    """Commands to one server over one connection, made on first use and remade when lost.

    A command is sent again on a fresh connection only when the one it went out on was
    lost before its reply: every script the gateway runs is keyed by its request id, so
    running one twice changes nothing. A connection that takes longer than `deadline`
    seconds to open, or to answer its oldest command, raises redis-py's TimeoutError,
    never sent again (the server may be stuck, not gone), and is dropped. A call none of
    whose tries reached the server's command loop (no connection, or one the server
    turned away at its client limit) raises `Unreachable`: none of it ran.
    """

    def __init__(self, url: str, deadline: float = 5.0) -> None:
        settings: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        scheme = url.partition("://")[0]
        self.path: str | None = settings.get("path")
        self.host: str = settings.get("host", "localhost")
        self.port: int = settings.get("port", 6379)
        self.tls = _tls_context(settings) if scheme == "rediss" else None
        self.handshake = _handshake(settings)
        self.deadline = deadline
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    @staticmethod
    def serves(url: str) -> bool:
        return url.partition("://")[0] in SINGLE_SERVER

    async def execute(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send `commands` in one write; their replies, each error reply as an exception
        instance (raise it or look at it)."""
        payload = b"".join(hiredis.pack_command(command) for command in commands)
        ran = False  # whether an attempt may have reached the server's command loop
        for attempt in range(1, ATTEMPTS + 1):
            try:
                connection = await self._connected()
            except rexc.RedisError as exc:
                if ran:
                    raise
                raise Unreachable(str(exc)) from exc
            try:
                return await connection.send(payload, len(commands))
            except rexc.ConnectionError as exc:
                ran = ran or not isinstance(exc, (Unreachable, rexc.MaxClientsReachedError))
                if attempt < ATTEMPTS:
                    await asyncio.sleep(RESEND_PAUSE_SECONDS * attempt)
                    continue
                if ran:  # whatever this last try met, an earlier one may have run
                    raise rexc.ConnectionError(str(exc)) from exc
                if isinstance(exc, Unreachable):
                    raise
                raise Unreachable(str(exc)) from exc
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Drop the connection; a later call makes a new one."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.loop.is_closed():
            connection.abort()

    async def _connected(self) -> _Connection:
        connection, loop = self._connection, asyncio.get_running_loop()
        if connection is not None and connection.open and connection.loop is loop:
            return connection
        if self._connecting is None or self._connecting.get_loop() is not loop:
            # One connect at a time; the other callers wait for it.
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected_or_failed)
        return await asyncio.shield(self._connecting)

    def _connected_or_failed(self, attempt: asyncio.Future[_Connection]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._connection = attempt.result()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        made = functools.partial(_Connection, self.deadline)
        try:
            async with asyncio.timeout(self.deadline):
                if self.path:
                    _, connection = await loop.create_unix_connection(made, self.path)
                else:
                    _, connection = await loop.create_connection(
                        made, self.host, self.port, ssl=self.tls
                    )
        except TimeoutError as exc:
            raise rexc.TimeoutError(f"no connection to the store in {self.deadline} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise rexc.ConnectionError(f"cannot connect to the store: {exc}") from exc
        if self.handshake:
            payload = b"".join(hiredis.pack_command(command) for command in self.handshake)
            for reply in await connection.send(payload, len(self.handshake)):
                if isinstance(reply, Exception):
                    connection.abort()
                    raise reply
        return connection


class _Waiter(NamedTuple):
    answered: asyncio.Future[list[Any]]
    replies: list[Any]
    expected: int  # replies
    sent: float  # event-loop time


class _Connection(asyncio.Protocol):
    """One connection: replies are matched to waiting callers in the order sent."""

    def __init__(self, deadline: float) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[_Waiter] = deque()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.open = False
        self.deadline = deadline
        self.watchdog: asyncio.TimerHandle | None = None
        self.failure: rexc.RedisError | None = None  # why it closed, once it has

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.open = cast(asyncio.Transport, transport), True
        self._watch()

    def send(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        if not self.open or self.transport is None:  # nothing written
            raise Unreachable("the connection to the store was lost") from self.failure
        answered: asyncio.Future[list[Any]] = self.loop.create_future()
        self.waiting.append(_Waiter(answered, [], count, self.loop.time()))
        self.transport.write(payload)
        return answered

    def _watch(self) -> None:
        if self.waiting and self.loop.time() - self.waiting[0].sent > self.deadline:
            stuck = rexc.TimeoutError(f"the store did not answer within {self.deadline} s")
            self.abort(stuck)
            return
        self.watchdog = self.loop.call_later(self.deadline / TICKS_PER_DEADLINE, self._watch)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            self._hand_out()
        except (hiredis.ProtocolError, IndexError):  # not Redis, or a reply nobody asked for
            self.abort()

    def _hand_out(self) -> None:
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError):
                reply = error_of(reply)
                if isinstance(reply, rexc.MaxClientsReachedError):
                    # Sent before the server reads a command: it turned this connection
                    # away, and no command on it ran.
                    self.abort(reply)
                    return
            answered, replies, count, _ = self.waiting[0]
            replies.append(reply)
            if len(replies) == count:
                self.waiting.popleft()
                if not answered.done():  # else its caller gave up waiting
                    answered.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rexc.ConnectionError("the connection to the store was lost"))

    def abort(self, reason: rexc.RedisError | None = None) -> None:
        """Close at once; the calls still waiting fail with `reason` (default: lost)."""
        self._fail(reason or rexc.ConnectionError("the connection to the store was lost"))
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, reason: rexc.RedisError) -> None:
        self.open, self.failure = False, self.failure or reason
        if self.watchdog is not None:
            self.watchdog.cancel()
        while self.waiting:
            answered = self.waiting.popleft().answered
            if not answered.done():
                answered.set_exception(reason)


def _handshake(settings: dict[str, Any]) -> list[tuple[Any, ...]]:
    commands: list[tuple[Any, ...]] = []
    if settings.get("password"):
        user, password = settings.get("username"), settings["password"]
        commands.append(("AUTH", user, password) if user else ("AUTH", password))
    if settings.get("db"):
        commands.append(("SELECT", settings["db"]))
    return commands


def _tls_context(settings: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py would use for the same URL (ssl_ca_certs, ssl_certfile...)."""
    options = {k: v for k, v in settings.items() if k.startswith("ssl_")}
    connection = SSLConnection(host=settings.get("host", "localhost"), **options)
    return connection.ssl_context.get()
