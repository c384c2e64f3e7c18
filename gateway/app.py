"""The Starlette application: routes, error bodies, start-up and shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import config as config_module
from gateway import metrics
from gateway.api import admin, chat, openapi, prompts
from gateway.api.http import JSON, error_response
from gateway.api.log import RequestLog
from gateway.config import Config
from gateway.errors import GatewayError, StoreUnavailable
from gateway.gateway import Gateway
from gateway.lifecycle import die_with_parent, worker_parent
from gateway.metrics import Recorder
from gateway.server import configure_logging

log = logging.getLogger(__name__)

API = "/api/ai-gateway"


async def healthz(request: Request) -> Response:
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    if await gateway.store.ready():
        return JSON({"status": "ready"})
    return error_response(
        StoreUnavailable("the store is unreachable or its scripts are not loaded")
    )


async def on_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    body = {"error": {"message": exc.detail, "type": kind, "code": str(exc.status_code)}}
    return JSON(body, status_code=exc.status_code, headers=exc.headers)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path, exc_info=exc)
    body = {"error": {"message": "internal error", "type": "api_error", "code": "internal_error"}}
    return JSON(body, status_code=500)


ROUTES = [
    Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
    Route("/v1/models", chat.list_models, methods=["GET"]),
    Route(f"{API}/complete", chat.native_complete, methods=["POST"]),
    Route(f"{API}/keys", admin.create_key, methods=["POST"]),
    Route(f"{API}/keys", admin.list_keys, methods=["GET"]),
    Route(f"{API}/keys/{{key_id}}", admin.show_key, methods=["GET"]),
    Route(f"{API}/keys/{{key_id}}", admin.revoke_key, methods=["DELETE"]),
    Route(f"{API}/prices", admin.list_prices, methods=["GET"]),
    Route(f"{API}/prices/{{model:path}}", admin.show_price, methods=["GET"]),
    Route(f"{API}/prices/{{model:path}}", admin.put_price, methods=["PUT"]),
    Route(f"{API}/usage", admin.list_usage, methods=["GET"]),
    Route(f"{API}/usage/totals", admin.usage_totals, methods=["GET"]),
    Route(f"{API}/prompts", prompts.list_prompts, methods=["GET"]),
    Route(f"{API}/prompts/{{name}}", prompts.push_version, methods=["POST"]),
    Route(f"{API}/prompts/{{name}}", prompts.show_prompt, methods=["GET"]),
    Route(f"{API}/prompts/{{name}}/activate", prompts.activate, methods=["POST"]),
    Route(f"{API}/prompts/{{name}}/render", prompts.render, methods=["POST"]),
    Route("/metrics", metrics.scrape, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi.schema, methods=["GET"]),
]


def create_app(
    config: Config | None = None, redis_url: str | None = None, cache_url: str | None = None
) -> Starlette:
    """The app for one worker; `gateway serve` sets GATEWAY_REDIS_URL for the embedded store."""
    configure_logging()
    supervisor = worker_parent()
    if supervisor is not None:
        die_with_parent(supervisor)
    config = config or config_module.load()
    redis_url = redis_url or os.environ.get("GATEWAY_REDIS_URL")
    if not redis_url:
        raise RuntimeError("GATEWAY_REDIS_URL is not set; start the gateway with `gateway serve`")
    gateway = Gateway.build(
        config, redis_url, cache_url or os.environ.get("GATEWAY_CACHE_REDIS_URL")
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await _start(gateway)
        yield
        await gateway.aclose()

    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(RequestLog, recorder=Recorder(config.metrics.per_key_labels))],
        exception_handlers={
            GatewayError: on_gateway_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    # A slash redirect would build its Location from the client's Host header.
    app.router.redirect_slashes = False
    return app


async def _start(gateway: Gateway) -> None:
    """Best effort: a store that is down at start must not stop the worker from serving 503s."""
    await gateway.store.warn_if_evicting()
    try:
        await gateway.admin.ensure()
        await gateway.prices.reload()
    except StoreUnavailable:
        log.warning("the store is unavailable at start; /readyz fails until it answers")
    gateway.prices.start()
