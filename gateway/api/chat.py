"""The client-facing endpoints: OpenAI chat completions, models, the native completion."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from gateway import keys
from gateway.admission import Ticket
from gateway.api.http import JSON, bearer, read_body
from gateway.cache import Entry, directives
from gateway.completions import Relay, Result
from gateway.errors import GatewayError
from gateway.gateway import Gateway
from gateway.money import to_usd
from gateway.plan import Plan
from gateway.schema import NativeRequest, check, decode
from gateway.streams import EventStream

PARSE_BEFORE_AUTH_BYTES = 64 * 1024


async def chat_completions(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    raw_key, plan = await _plan(request, gateway)
    ticket, hit = await gateway.completions.admit(raw_key, plan)
    if plan.stream:
        return _stream(request, gateway, plan, ticket, hit)  # type: ignore[return-value]
    result = await gateway.completions.complete(plan, ticket, hit)
    _note_result(request, result)
    headers = _headers(ticket, result.provider, result.cached, result.cost)
    return JSON(result.body, headers=headers, background=BackgroundTask(result.settle))


def _stream(
    request: Request, gateway: Gateway, plan: Plan, ticket: Ticket, hit: Entry | None
) -> EventStream:
    relay: Relay | None = None

    async def start() -> tuple[dict[str, str], AsyncIterator[bytes]]:
        nonlocal relay
        relay = await gateway.completions.open_stream(plan, ticket, hit)
        _note(request, provider=relay.provider, cache="hit" if hit else "miss")
        headers = _headers(ticket, relay.provider, hit is not None, 0 if hit else None)
        return headers, relay.events()

    async def settle() -> None:
        if relay is not None:  # else opening failed or was cancelled, and released
            await relay.finish()
            input_tokens, output_tokens = relay.tokens
            _note(request, cost=to_usd(relay.cost), upstream_seconds=relay.upstream_seconds)
            _note(request, input_tokens=input_tokens, output_tokens=output_tokens)

    return EventStream(start, settle)


async def native_complete(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    raw_key, plan = await _plan(request, gateway, native=True)
    ticket, hit = await gateway.completions.admit(raw_key, plan)
    result = await gateway.completions.complete(plan, ticket, hit)
    _note_result(request, result)
    headers = _headers(ticket, result.provider, result.cached, result.cost)
    return JSON(_native(result, plan), headers=headers, background=BackgroundTask(result.settle))


async def list_models(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    key_id, fields = await keys.authenticate(gateway.store, bearer(request))
    _note(request, key=key_id)
    allowed = keys.allowed_models(fields) or list(gateway.config.models)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "ai-gateway"}
        for name in gateway.config.models
        if name in allowed
    ]
    return JSON({"object": "list", "data": data})


async def _plan(request: Request, gateway: Gateway, *, native: bool = False) -> tuple[str, Plan]:
    raw_key = bearer(request)
    key_id, _ = keys.identify(raw_key)
    _note(request, key=key_id)
    # A valid request's key is checked by admission, in the same script call as everything
    # else. Before that, a key is looked up on its own only when something would otherwise
    # be told to whoever sent it: a fault in its body, or a stored prompt.
    known = False
    declared = request.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) > PARSE_BEFORE_AUTH_BYTES:
        # Parsing a large body costs more than a key lookup: an unknown key is refused first.
        await keys.authenticate(gateway.store, raw_key)
        known = True
    try:
        body = decode(await read_body(request, gateway.config.limits.max_body_bytes))
        if native:
            check(NativeRequest, body)
        if not known and isinstance(body, dict) and "prompt" in body:
            await keys.authenticate(gateway.store, raw_key)  # templates are not for strangers
            known = True
        cache_control = directives(request.headers.get("cache-control"))
        plan = await gateway.completions.plan(body, key_id, cache_control, request.state.request_id)
    except GatewayError:
        if not known:  # an unknown or revoked key hears 401, not what was wrong with its body
            await keys.authenticate(gateway.store, raw_key)
        raise
    _note(request, model=plan.model)
    return raw_key, plan


def _headers(ticket: Ticket, provider: str, cached: bool, cost: int | None) -> dict[str, str]:
    headers = {"x-gateway-cache": "hit" if cached else "miss", "x-gateway-provider": provider}
    if cost is not None:
        headers["x-gateway-cost"] = f"{to_usd(cost):.9f}"
    if ticket.limit > 0:
        headers["x-ratelimit-limit-requests"] = str(ticket.limit)
        headers["x-ratelimit-remaining-requests"] = str(max(ticket.remaining, 0))
        headers["x-ratelimit-reset-requests"] = f"{ticket.reset_ms / 1000:.3f}s"
    return headers


def _native(result: Result, plan: Plan) -> dict[str, Any]:
    message = result.body["choices"][0]["message"] if result.body.get("choices") else {}
    return {
        "content": message.get("content") or "",
        "model": plan.model,
        "provider": result.provider,
        "input_tokens": result.input_tokens,
        "output_tokens": result.output_tokens,
        "cached": result.cached,
        "cost": to_usd(result.cost),
    }


def _note_result(request: Request, result: Result) -> None:
    _note(
        request,
        provider=result.provider,
        cache="hit" if result.cached else "miss",
        cost=to_usd(result.cost),
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        upstream_seconds=result.upstream_seconds,
    )


def _note(request: Request, **fields: Any) -> None:
    """Fields for the one log line of this request (see gateway.api.log)."""
    request.state.log.update(fields)
