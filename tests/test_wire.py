"""The hot path's pipelined connection: order, errors, reconnects, timeouts, URL settings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis import exceptions as rexc

from gateway import store as store_module
from gateway.admission import Gate
from gateway.errors import StoreUnavailable
from gateway.store import Store
from gateway.store.wire import ATTEMPTS, Unreachable, Wire, _Connection
from tests.servers import RedisServer, free_port

pytestmark = [pytest.mark.redis]

ECHO_SCRIPT = "return {ARGV[1], redis.call('INCR', KEYS[1])}"
ANY_KEY = "sk-gw-" + "k" * 43  # well formed, so admission goes to the store


@pytest.fixture
def server() -> Iterator[RedisServer]:
    redis_server = RedisServer().start()
    yield redis_server
    redis_server.stop()


async def test_concurrent_calls_on_one_connection_each_get_their_own_reply(
    server: RedisServer,
) -> None:
    wire = Wire(server.url)
    try:
        replies = await asyncio.gather(*(wire.execute(("ECHO", f"n{i}")) for i in range(500)))
        assert replies == [[f"n{i}".encode()] for i in range(500)]
        clients = server.client().client_list()
        assert len([c for c in clients if c["cmd"] == "echo"]) == 1  # one connection carried all
    finally:
        await wire.aclose()


async def test_several_commands_answer_together_and_errors_come_back_as_exceptions(
    server: RedisServer,
) -> None:
    wire = Wire(server.url)
    try:
        server.client().set("text", "x")
        missing, wrong_type, fine = await wire.execute(
            ("EVALSHA", "0" * 40, 0), ("INCR", "text"), ("INCR", "counter")
        )
        assert isinstance(missing, rexc.NoScriptError)
        assert type(wrong_type) is rexc.ResponseError and "not an integer" in str(wrong_type)
        assert fine == 1
    finally:
        await wire.aclose()


async def test_store_reloads_a_flushed_script_and_runs_it(server: RedisServer) -> None:
    store = Store(server.url)
    try:
        store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)
        assert await store.run("echo", ["{t}:n"], ["a"]) == [b"a", 1]
        server.client().script_flush()
        assert await store.run("echo", ["{t}:n"], ["b"]) == [b"b", 2]
    finally:
        await store.close()


async def test_a_killed_connection_is_replaced_and_the_command_sent_again(
    server: RedisServer,
) -> None:
    wire = Wire(server.url)
    try:
        assert await wire.execute(("INCR", "n")) == [1]
        killed = server.client().client_kill_filter(_type="normal", skipme=True)
        assert killed >= 1
        assert await wire.execute(("INCR", "n")) == [2]
    finally:
        await wire.aclose()


async def test_store_down_is_a_503_and_a_restarted_store_serves_again(
    server: RedisServer,
) -> None:
    store = Store(server.url)
    store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)
    try:
        assert await store.run("echo", ["{t}:n"], ["a"]) == [b"a", 1]
        server.kill()
        with pytest.raises(StoreUnavailable):
            await store.run("echo", ["{t}:n"], ["b"])
        server.start()  # same port, empty data, no scripts loaded
        assert await store.run("echo", ["{t}:n"], ["c"]) == [b"c", 1]
    finally:
        await store.close()


async def test_a_stuck_call_times_out_as_a_503_and_the_next_call_reconnects(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "COMMAND_SECONDS", 0.5)
    store = Store(server.url)
    store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)
    try:
        assert await store.run("echo", ["{t}:n"], ["a"]) == [b"a", 1]
        server.client().execute_command("CLIENT", "PAUSE", "1500", "ALL")
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            await store.run("echo", ["{t}:n"], ["b"])
        await asyncio.sleep(1.2)  # the pause ends; the stuck connection was dropped
        # The timed-out call may have run after all (scripts are idempotent by request id).
        answer = await store.run("echo", ["{t}:n"], ["c"])
        assert answer[0] == b"c" and answer[1] in (2, 3)
    finally:
        await store.close()


async def test_a_stuck_call_fails_within_a_quarter_deadline_past_it_and_is_not_sent_again(
    server: RedisServer,
) -> None:
    wire = Wire(server.url, deadline=0.4)
    try:
        assert await wire.execute(("INCR", "n")) == [1]
        server.client().execute_command("CLIENT", "PAUSE", "1500", "ALL")
        started = time.monotonic()
        with pytest.raises(rexc.TimeoutError, match=r"did not answer within 0\.4 s"):
            await wire.execute(("INCR", "n"))
        assert 0.4 <= time.monotonic() - started < 0.4 * 1.25 + 0.1
        await asyncio.sleep(1.3)  # the pause ends
        # Redis drops the paused command of a connection closed meanwhile: had the stuck
        # INCR been sent again on a new connection, it would have run and this would be 3.
        assert await wire.execute(("INCR", "n")) == [2]
    finally:
        await wire.aclose()


async def test_an_idle_connection_outlives_many_deadlines(server: RedisServer) -> None:
    wire = Wire(server.url, deadline=0.1)
    try:
        assert await wire.execute(("INCR", "n")) == [1]
        await asyncio.sleep(0.6)  # six deadlines with nothing waiting: the watchdog holds off
        assert await wire.execute(("INCR", "n")) == [2]
        clients = server.client().client_list()
        assert len([c for c in clients if c["cmd"] == "incr"]) == 1
    finally:
        await wire.aclose()


async def test_a_handshake_that_never_ends_is_a_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes the TLS hello, never answers it

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    wire = Wire(f"rediss://127.0.0.1:{port}/0", deadline=0.3)
    try:
        with pytest.raises(Unreachable, match=r"no connection to the store in 0\.3 s") as raised:
            await wire.execute(("PING",))
        assert isinstance(raised.value.__cause__, rexc.TimeoutError)  # nothing was sent
    finally:
        await wire.aclose()
        server.close()


async def test_a_write_waiting_for_replicas_gets_the_wait_timeout_on_top_of_the_deadline(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "COMMAND_SECONDS", 0.3)
    replica = RedisServer()
    replica.extra_args = ["--replicaof", "127.0.0.1", str(server.port)]
    replica.start()
    store = Store(server.url, wait_replicas=2, wait_timeout_ms=800)  # one replica: WAIT waits
    store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)
    try:
        started = time.monotonic()
        assert await store.run("echo", ["{t}:n"], ["a"]) == [b"a", 1]
        assert time.monotonic() - started >= 0.8  # past COMMAND_SECONDS, and answered
    finally:
        await store.close()
        replica.stop()


async def test_password_and_database_from_the_url() -> None:
    server = RedisServer()
    server.extra_args = ["--requirepass", "s3cret"]
    server.url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
    server.start()
    store = Store(server.url)
    store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)
    try:
        assert await store.run("echo", ["{t}:n"], ["a"]) == [b"a", 1]
        assert server.client().get("{t}:n") == "1"  # the client() of this URL reads db 3
        wrong = Store(f"redis://:wrong@127.0.0.1:{server.port}/3")
        wrong.scripts["echo"] = store.scripts["echo"]
        connections = server.client().info("stats")["total_connections_received"]
        with pytest.raises(StoreUnavailable, match="AuthenticationError"):
            await wrong.run("echo", ["{t}:n"], ["b"])
        await wrong.close()
        # Refused credentials are not tried again (one of the two is the INFO client).
        after = server.client().info("stats")["total_connections_received"]
        assert after == connections + 2
    finally:
        await store.close()
        server.stop()


async def test_a_unix_socket_url() -> None:
    folder = tempfile.mkdtemp(prefix="gw-sock-")
    path = os.path.join(folder, "redis.sock")
    server = RedisServer()
    server.extra_args = ["--unixsocket", path]
    server.start()
    store = Store(f"unix://{path}?db=2")
    store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)
    try:
        assert await store.run("echo", ["{t}:n"], ["a"]) == [b"a", 1]
        assert redis.Redis(unix_socket_path=path, db=2).get("{t}:n") == b"1"
        assert redis.Redis(unix_socket_path=path, db=0).get("{t}:n") is None
    finally:
        await store.close()
        server.stop()


def test_one_store_serves_one_event_loop_after_another(server: RedisServer) -> None:
    store = Store(server.url)
    store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)

    async def once(text: str) -> list[bytes]:
        answer: list[bytes] = await store.run("echo", ["{t}:n"], [text])
        return answer

    assert asyncio.run(once("a")) == [b"a", 1]
    assert asyncio.run(once("b")) == [b"b", 2]  # a connection belongs to its loop
    asyncio.run(store.close())


def test_cluster_and_sentinel_urls_stay_on_redis_py() -> None:
    assert Wire.serves("redis://h:6379/0") and Wire.serves("rediss://h:6380/0")
    assert Wire.serves("unix:///run/redis.sock")
    assert not Wire.serves("redis+cluster://h:7000")
    assert not Wire.serves("redis+sentinel://h:26379/mymaster")


async def test_a_server_that_does_not_speak_redis_is_a_lost_connection() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # not RESP: hiredis rejects it
        await writer.drain()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    wire = Wire(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(rexc.ConnectionError, match="lost"):
            await wire.execute(("PING",))
    finally:
        await wire.aclose()
        server.close()


async def test_wait_replicas_sends_wait_behind_the_script_in_the_same_write(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    replica = RedisServer()
    replica.extra_args = ["--replicaof", "127.0.0.1", str(server.port)]
    replica.start()
    store = Store(server.url, wait_replicas=1, wait_timeout_ms=2000)
    store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)
    try:
        for _ in range(100):  # until the replica's link is up
            if replica.client().info("replication")["master_link_status"] == "up":
                break
            await asyncio.sleep(0.05)
        for n in range(1, 4):
            assert await store.run("echo", ["{t}:n"], ["a"]) == [b"a", n]
            assert replica.client().get("{t}:n") == str(n)  # there before the answer
        replica.kill()
        with caplog.at_level("WARNING", logger="gateway.store"):
            assert await store.run("echo", ["{t}:n"], ["b"]) == [b"b", 4]
        assert "a write reached 0 of 1 replicas in time" in caplog.text
    finally:
        await store.close()
        replica.stop()


async def test_a_script_flushed_again_while_it_is_reloaded_still_runs(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flushed before every command: the EVALSHA finds nothing and so would an EVALSHA
    after SCRIPT LOAD; the script sent whole with EVAL cannot miss."""
    store = Store(server.url)
    store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)
    assert store.wire is not None
    flusher, execute = server.client(), store.wire.execute

    async def flushed_first(*commands: tuple[object, ...]) -> list[object]:
        flusher.script_flush()
        return await execute(*commands)

    monkeypatch.setattr(store.wire, "execute", flushed_first)
    try:
        assert await store.run("echo", ["{t}:n"], ["a"]) == [b"a", 1]
        assert await store.run("echo", ["{t}:n"], ["b"]) == [b"b", 2]
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("refusal", "undo"),
    [
        (("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "SET", "maxmemory", "0")),  # OOM
        (("CONFIG", "SET", "maxclients", "1"), ("CONFIG", "SET", "maxclients", "10000")),
    ],
    ids=["out-of-memory", "max-clients"],
)
async def test_a_server_refusing_commands_for_now_is_a_503_and_serves_when_it_stops(
    server: RedisServer, refusal: tuple[str, ...], undo: tuple[str, ...]
) -> None:
    store = Store(server.url)
    store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)
    admin = server.client()
    admin.ping()  # its connection is open, counted among the clients, before the refusal
    try:
        admin.execute_command(*refusal)
        with pytest.raises(StoreUnavailable):
            await store.run("echo", ["{t}:n"], ["a"])
        admin.execute_command(*undo)
        assert await store.run("echo", ["{t}:n"], ["b"]) == [b"b", 1]
    finally:
        admin.execute_command(*undo)
        await store.close()


async def test_a_server_busy_with_a_runaway_script_is_a_503(server: RedisServer) -> None:
    store = Store(server.url)
    store.scripts["echo"] = store.binary.register_script(ECHO_SCRIPT)
    admin = server.client()
    admin.config_set("busy-reply-threshold", 50)
    runaway = asyncio.create_task(asyncio.to_thread(server.client().eval, "while true do end", 0))
    try:
        await asyncio.sleep(0.3)  # past the threshold: every command now gets BUSY
        with pytest.raises(StoreUnavailable, match="ResponseError"):
            await store.run("echo", ["{t}:n"], ["a"])
        admin.script_kill()
        with pytest.raises(rexc.ResponseError, match="killed"):
            await runaway
        assert await store.run("echo", ["{t}:n"], ["b"]) == [b"b", 1]
    finally:
        with contextlib.suppress(rexc.ResponseError):
            admin.script_kill()  # the runaway, if the test failed before its kill
        await store.close()


async def refused_admission(store: Store) -> tuple[StoreUnavailable, Gate]:
    """Admit against a store that cannot take it: the 503 and the gate it left."""
    gate = Gate(store, lease_ms=60_000, retention_ms=86_400_000)
    with pytest.raises(StoreUnavailable) as refused:
        await gate.admit(ANY_KEY, "m", "refused", 1000)
    return refused.value, gate


async def test_a_call_that_never_left_is_known_not_to_have_run_and_leaves_nothing_to_undo() -> None:
    """Nothing listens: no connection, nothing sent, so an admission leaves no release
    retrying in the background (a store refusing connections under load would gather
    one per refused request)."""
    store = Store(f"redis://127.0.0.1:{free_port()}/0")
    try:
        refused, gate = await refused_admission(store)
        assert "ConnectionError" in refused.message
        assert (refused.may_have_run, gate._retries) == (False, set())
    finally:
        await store.close()


async def test_a_server_at_its_client_limit_ran_nothing_and_leaves_nothing_to_undo(
    server: RedisServer,
) -> None:
    """Redis says "max number of clients reached" on a connection before reading from
    it: no command on it ran, so an admission refused so starts no release."""
    store = Store(server.url)
    admin = server.client()
    admin.ping()  # counted among the clients before the limit
    admin.config_set("maxclients", 1)
    try:
        refused, gate = await refused_admission(store)
        assert "MaxClientsReachedError" in refused.message
        assert (refused.may_have_run, gate._retries) == (False, set())
    finally:
        admin.config_set("maxclients", 10000)
        await store.close()


async def test_a_call_whose_connection_was_lost_after_sending_may_have_run() -> None:
    async def read_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(read_then_hang_up, "127.0.0.1", 0)
    store = Store(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0")
    try:
        lost, gate = await refused_admission(store)
        assert lost.may_have_run is True
        assert len(gate._retries) == 1  # the release of what may have been reserved
        for task in gate._retries:
            task.cancel()
    finally:
        await store.close()
        server.close()


async def test_a_call_one_of_whose_tries_was_sent_may_have_run_whatever_the_last_met(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first tries go out and their connections are lost; the last finds its
    connection closed before writing. The call as a whole may still have run."""

    async def read_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(read_then_hang_up, "127.0.0.1", 0)
    wire = Wire(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0")
    send, tries = _Connection.send, []

    def closed_at_the_last_try(self: _Connection, payload: bytes, count: int) -> Any:
        tries.append(payload)
        if len(tries) == ATTEMPTS:
            raise Unreachable("the connection to the store was lost")
        return send(self, payload, count)

    monkeypatch.setattr(_Connection, "send", closed_at_the_last_try)
    try:
        with pytest.raises(rexc.ConnectionError) as lost:
            await wire.execute(("INCR", "n"))
        assert len(tries) == ATTEMPTS
        assert not isinstance(lost.value, Unreachable)
    finally:
        await wire.aclose()
        server.close()
