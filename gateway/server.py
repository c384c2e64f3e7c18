"""`gateway serve`: the embedded store when no Redis is named, then uvicorn workers."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from typing import Any

import orjson
import uvicorn
from uvicorn.supervisors import Multiprocess

from gateway import config as config_module
from gateway import http_protocol
from gateway.auth import data_dir
from gateway.errors import ConfigError
from gateway.store import topology
from gateway.store.embedded import EmbeddedServer

log = logging.getLogger(__name__)


class Stopped(Exception):
    """SIGTERM or SIGINT: uvicorn raises the signal again once it has shut down gracefully."""


def _stopped(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor, closing its own copy of the listening socket on a stop
    signal. uvicorn's keeps it open until it exits, so for the whole drain the kernel
    completes handshakes no worker accepts and resets them at the end: a balancer has
    already sent its request on such a connection and will not pass it to another replica.
    Closed, the port refuses as soon as the workers close theirs."""

    def handle_term(self) -> None:
        self._stop_listening()
        super().handle_term()

    def handle_int(self) -> None:
        self._stop_listening()
        super().handle_int()

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            sock.close()


def _run_uvicorn(host: str, port: int, workers: int, options: dict[str, Any]) -> None:
    app = "gateway.app:create_app"
    if workers == 1:
        uvicorn.run(app, host=host, port=port, **options)
        return
    config = uvicorn.Config(app, host=host, port=port, workers=workers, **options)
    _Supervisor(config, sockets=[config.bind_socket()]).run()


def _fresh_metrics_dir() -> str | None:
    """Where workers write Prometheus samples, emptied so a restart starts from zero; the
    folder made here when none was named, for removal at the end."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)
        return None
    made = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made


def _check_url(name: str) -> None:
    url = os.environ.get(name)
    if not url:
        return
    try:
        topology.connect(url)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JSONFormatter(logging.Formatter):
    """One JSON object per line; a request line carries its fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,  # which worker, when a replica runs several
        }
        request = getattr(record, "request", None)
        if isinstance(request, dict):
            entry.update(request)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging() -> None:
    """One handler on the `gateway` logger; GATEWAY_LOG_FORMAT=json for JSON lines."""
    root = logging.getLogger("gateway")
    if not root.handlers:
        handler = logging.StreamHandler()
        if os.environ.get("GATEWAY_LOG_FORMAT", "").lower() == "json":
            handler.setFormatter(JSONFormatter())
        else:
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper())
        root.propagate = False


def serve(host: str, port: int, workers: int, config_path: str | None) -> None:
    """Check everything a worker needs, start the embedded store if asked, run uvicorn."""
    configure_logging()
    if config_path:
        os.environ["GATEWAY_CONFIG"] = config_path
    config = config_module.load()  # refuse a bad config before anything starts
    for name in ("GATEWAY_REDIS_URL", "GATEWAY_CACHE_REDIS_URL"):
        _check_url(name)
    # A stop signal before uvicorn takes over, or the one it raises again after its
    # graceful shutdown, ends up here as Stopped: the store and the metrics folder are
    # cleaned up and the process exits 0.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    embedded, metrics_dir = None, None
    try:
        if not os.environ.get("GATEWAY_REDIS_URL"):
            embedded = EmbeddedServer(data_dir())
            try:
                os.environ["GATEWAY_REDIS_URL"] = embedded.start()
            except (OSError, RuntimeError) as exc:
                raise ConfigError(f"GATEWAY_DATA_DIR: {exc}") from exc
        metrics_dir = _fresh_metrics_dir()
        log.info("gateway listening on http://%s:%d with %d worker(s)", host, port, workers)
        options = {
            "factory": True,
            "http": http_protocol.protocol(config.limits),
            "ws": "none",  # no WebSocket endpoint: an upgrade request is served as plain HTTP
            "access_log": False,
            "log_level": "warning",
            "timeout_graceful_shutdown": int(config.limits.request_timeout_seconds),
        }
        _run_uvicorn(host, port, workers, options)
    except Stopped:
        pass  # the graceful shutdown is done; clean up below and exit 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if embedded is not None:
            embedded.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("gateway stopped")
