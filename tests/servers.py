"""Real servers for the tests: throwaway Redis processes, uvicorn in a thread, gateway processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn

from gateway import http_protocol
from gateway.config import LimitsConfig
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

    def __init__(self, app: Any, limits: LimitsConfig | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            http=http_protocol.protocol(limits or LimitsConfig()),  # as `gateway serve` runs
            ws="none",
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
        # A temporary folder of its own (for its metrics folder), removed once it is
        # gone: a SIGKILLed gateway cannot clean up after itself.
        self.tmp = None if "TMPDIR" in env else tempfile.mkdtemp(prefix="gw-tmp-")
        self.env = {**os.environ, **env, **({"TMPDIR": self.tmp} if self.tmp else {})}
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        return self.launch().wait_ready()

    def launch(self) -> GatewayProcess:
        # A file, not a pipe: a busy gateway logs more than a pipe holds unread.
        self.log = tempfile.NamedTemporaryFile(prefix="gw-log-", suffix=".txt")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.args, env=self.env, cwd=self.cwd, stderr=self.log,
            preexec_fn=die_with_parent, start_new_session=True,
        )  # fmt: skip
        return self

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every worker at once, as a crashed host would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def wait_ready(self) -> GatewayProcess:
        wait_until(lambda: httpx.get(self.url + "/readyz").status_code == 200, timeout=60)
        return self

    def stop(self) -> str:
        """Stop it (once) and return what it logged."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log.closed:
            self.log.seek(0)
            self.logged = self.log.read().decode(errors="replace")
            self.log.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.logged


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
        # Linked, not only connected: until the initial sync ends the replica holds nothing.
        wait_until(lambda: self.replica.client().info("replication")["master_link_status"] == "up")
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
            wait_until(lambda c=client: self._watched(c.sentinel_master(self.service)), timeout=20)
        return self

    @staticmethod
    def _watched(master: dict[str, Any]) -> bool:
        """A sentinel knows the other two and the replica, so it can fail over to it."""
        return bool(master["num-other-sentinels"] == 2 and master["num-slaves"] == 1)

    def master_port(self) -> int:
        client = redis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        return int(client.sentinel_get_master_addr_by_name(self.service)[1])

    def stop(self) -> None:
        for process in self.sentinels:
            process.kill()
            process.wait()
        self.master.stop()
        self.replica.stop()


DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def local_nginx_config(directory: Path, upstreams: Sequence[str], listen: str) -> list[str]:
    """Lay out deploy/nginx.conf in `directory` for local replicas; return nginx's argv.

    `upstreams` are "127.0.0.1:PORT" strings, `listen` is e.g. "127.0.0.1:18080". The
    written nginx.conf is deploy/nginx.conf with only its `listen 8080;` changed; the
    written nginx-upstreams.conf is deploy/nginx-upstreams.conf with its `server` lines
    replaced by `upstreams` (same parameters: max_fails, keepalive... unchanged), plus
    temp paths inside `directory` (the packaged defaults may not be writable). The pid file
    and the early error log go to `directory` and stderr through the command line; the
    access log goes to nginx's stdout. The argv runs nginx in the foreground: add "-t" to
    check the configuration only; stop it with SIGQUIT (graceful) or SIGTERM.
    """
    if not upstreams:
        raise ValueError("no upstream servers")
    directory.mkdir(parents=True, exist_ok=True)

    conf = (DEPLOY / "nginx.conf").read_text()
    listen_line = re.compile(r"^(\s*)listen\s+8080\s*;", re.MULTILINE)
    if len(listen_line.findall(conf)) != 1:
        raise AssertionError("deploy/nginx.conf must have exactly one `listen 8080;`")
    conf = listen_line.sub(lambda m: f"{m.group(1)}listen {listen};", conf)
    (directory / "nginx.conf").write_text(conf)

    upstream_text = (DEPLOY / "nginx-upstreams.conf").read_text()
    server_line = re.compile(r"^(\s*)server\s+(\S+)([^;\n]*);[^\n]*\n", re.MULTILINE)
    found = list(server_line.finditer(upstream_text))
    if not found:
        raise AssertionError("deploy/nginx-upstreams.conf has no `server` line")
    indent, params = found[0].group(1), found[0].group(3)
    local_lines = "".join(f"{indent}server {address}{params};\n" for address in upstreams)
    first, last = found[0].start(), found[-1].end()
    between = server_line.sub("", upstream_text[first:last])
    upstream_text = upstream_text[:first] + local_lines + between + upstream_text[last:]
    temp = directory / "temp"
    temp.mkdir(exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        upstream_text += f"{kind}_temp_path {temp / kind};\n"
    (directory / "nginx-upstreams.conf").write_text(upstream_text)

    globals_ = f'daemon off; pid "{directory / "nginx.pid"}";'
    # Run by root, nginx's workers would drop to "nobody", which cannot reach a private
    # temporary directory; keep them as the invoking user instead.
    if os.geteuid() == 0:
        globals_ += " user root;"
    nginx = shutil.which("nginx") or "nginx"
    conf_path = str(directory / "nginx.conf")
    return [nginx, "-p", str(directory), "-c", conf_path, "-e", "stderr", "-g", globals_]


class Nginx:
    """deploy/nginx.conf in front of local replicas, on a free port."""

    def __init__(self, directory: Path, upstreams: Sequence[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = local_nginx_config(directory, upstreams, f"127.0.0.1:{self.port}")
        self.log = directory / "nginx.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=die_with_parent
            )
        wait_until(lambda: httpx.get(self.url + "/healthz").status_code == 200)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
