"""Real servers for the tests: throwaway Redis processes, uvicorn in a thread, gateway processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn

from gateway.lifecycle import die_with_parent
from gateway.store.embedded import server_binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def wait_until(check: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"gave up waiting after {timeout} s")


def redis_binary() -> str:
    """redis-server when installed, else the valkey-server the gateway ships with."""
    return shutil.which("redis-server") or server_binary()


class RedisServer:
    """A Redis-protocol server on a free port, nothing on disk; start, stop, kill, restart."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="gw-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    def start(self) -> RedisServer:
        args = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self.dir,
            "--maxmemory-policy", "noeviction", *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        wait_until(self.client().ping)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=2)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


class ThreadServer:
    """An ASGI app served by uvicorn on a free port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class GatewayProcess:
    """`gateway serve` as a real process (several uvicorn workers), stopped with SIGTERM."""

    def __init__(
        self,
        config_path: Path | None,
        env: dict[str, str],
        workers: int = 2,
        cwd: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable, "-m", "gateway", "serve", "--port", str(self.port),
            "--workers", str(workers),
        ]  # fmt: skip
        if config_path:
            self.args += ["--config", str(config_path)]
        self.env = {**os.environ, **env}
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        self.process = subprocess.Popen(
            self.args, env=self.env, cwd=self.cwd, stderr=subprocess.PIPE
        )
        wait_until(lambda: httpx.get(self.url + "/readyz").status_code == 200, timeout=30)
        return self

    def stop(self) -> str:
        """Stop it and return what it logged."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return err.decode(errors="replace")


class RedisClusterServers:
    """`masters` cluster-enabled servers on free ports, their slots split evenly, no replicas."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer(cluster_port()) for _ in range(masters)]
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.extra_args = ["--cluster-enabled", "yes",
                               "--cluster-config-file", f"{node.dir}/nodes.conf"]  # fmt: skip
            node.start()
        clients = [node.client() for node in self.nodes]
        share = 16384 // len(self.nodes)
        for i, client in enumerate(clients):
            last = 16383 if i == len(clients) - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)
        wait_until(lambda: all(_cluster_ok(c, len(clients)) for c in clients), timeout=20)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_ok(client: redis.Redis, masters: int) -> bool:
    info = client.execute_command("CLUSTER", "INFO")
    info = info if isinstance(info, str) else info.decode()
    return "cluster_state:ok" in info and f"cluster_known_nodes:{masters}" in info


class SentinelGroup:
    """A master, one replica and three sentinels watching them (quorum 2, 1 s down-after)."""

    def __init__(self, service: str = "mymaster") -> None:
        self.service = service
        self.master = RedisServer()
        self.replica = RedisServer()
        self.replica.extra_args = ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        self.url = f"redis+sentinel://{hosts}/{service}"

    def start(self) -> SentinelGroup:
        self.master.start()
        self.replica.start()
        wait_until(lambda: self.master.client().info("replication")["connected_slaves"] == 1)
        for port in self.sentinel_ports:
            conf = Path(self.master.dir) / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.master.dir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [redis_binary(), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=die_with_parent,
                )
            )
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, decode_responses=True)
            wait_until(lambda c=client: c.sentinel_master(self.service)["num-other-sentinels"] == 2)
        return self

    def master_port(self) -> int:
        client = redis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        return int(client.sentinel_get_master_addr_by_name(self.service)[1])

    def stop(self) -> None:
        for process in self.sentinels:
            process.kill()
            process.wait()
        self.master.stop()
        self.replica.stop()
