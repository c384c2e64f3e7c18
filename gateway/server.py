"""`gateway serve`: the embedded store when no Redis is named, then uvicorn workers."""

from __future__ import annotations

import logging
import os

import uvicorn

from gateway import config as config_module
from gateway.auth import data_dir
from gateway.store.embedded import EmbeddedServer

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging() -> None:
    root = logging.getLogger("gateway")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper())
        root.propagate = False


def serve(host: str, port: int, workers: int, config_path: str | None) -> None:
    configure_logging()
    if config_path:
        os.environ["GATEWAY_CONFIG"] = config_path
    config = config_module.load()  # refuse a bad config before anything starts
    embedded = None
    if not os.environ.get("GATEWAY_REDIS_URL"):
        embedded = EmbeddedServer(data_dir())
        os.environ["GATEWAY_REDIS_URL"] = embedded.start()
    try:
        uvicorn.run(
            "gateway.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=int(config.limits.request_timeout_seconds),
        )
    finally:
        if embedded is not None:
            embedded.stop()
