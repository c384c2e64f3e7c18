"""The admin API: keys, prices, usage. Every endpoint checks the admin key first."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from gateway import keys, usage
from gateway.api.http import JSON, bearer, read_body
from gateway.errors import BadRequest, Forbidden, NotFound, Unauthorized
from gateway.gateway import Gateway
from gateway.prices import Price
from gateway.schema import check, decode

_ADMIN_BODY_LIMIT = 64 * 1024
USD = Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]


class PriceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input_per_1k: USD
    output_per_1k: USD


async def admin_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    await gateway.admin.check(bearer(request))
    return gateway


async def create_key(request: Request) -> Response:
    gateway = await admin_gateway(request)
    body = decode(await read_body(request, _ADMIN_BODY_LIMIT))
    spec = check(keys.KeySpec, body)
    assert isinstance(spec, keys.KeySpec)
    for i, model in enumerate(spec.allowed_models):
        if model not in gateway.config.models:
            raise BadRequest(f"allowed_models[{i}]: unknown model {model!r}")
    raw, record = await keys.create(gateway.store, spec)
    record["spend_month"] = record["spend"] = 0.0
    return JSON({"key": raw, "record": record}, status_code=201)


async def list_keys(request: Request) -> Response:
    """Every key; with `limit`, a page of keys in id order and the `next` cursor."""
    gateway = await admin_gateway(request)
    params = request.query_params
    limit = _page_limit(params.get("limit"))
    month = await gateway.store.month()
    found, following = await keys.listing(gateway.store, month, params.get("cursor", ""), limit)
    return JSON({"keys": found, "next": following})


def _page_limit(value: str | None) -> int | None:
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= usage.MAX_LIMIT):
        raise BadRequest(f"limit: must be an integer between 1 and {usage.MAX_LIMIT}")
    return int(value)


async def show_key(request: Request) -> Response:
    gateway = await admin_gateway(request)
    record = await keys.fetch(
        gateway.store, request.path_params["key_id"], await gateway.store.month()
    )
    if record is None:
        raise NotFound("no such key", code="key_not_found")
    return JSON(record)


async def revoke_key(request: Request) -> Response:
    gateway = await admin_gateway(request)
    key_id = request.path_params["key_id"]
    if not await keys.revoke(gateway.store, key_id):
        raise NotFound("no such key", code="key_not_found")
    return JSON({"id": key_id, "revoked": True})


async def list_prices(request: Request) -> Response:
    gateway = await admin_gateway(request)
    return JSON({"prices": gateway.prices.as_json()})


async def show_price(request: Request) -> Response:
    gateway = await admin_gateway(request)
    model = _known_model(gateway, request)
    return JSON({"model": model, **gateway.prices[model].as_json()})


async def put_price(request: Request) -> Response:
    gateway = await admin_gateway(request)
    model = _known_model(gateway, request)
    spec = check(PriceSpec, decode(await read_body(request, _ADMIN_BODY_LIMIT)))
    assert isinstance(spec, PriceSpec)
    await gateway.prices.put(model, Price.of(spec.input_per_1k, spec.output_per_1k))
    return JSON({"model": model, **gateway.prices[model].as_json()})


async def list_usage(request: Request) -> Response:
    """Admin: any key's records. A gateway key: its own only."""
    gateway: Gateway = request.app.state.gateway
    own_key = await _usage_caller(gateway, bearer(request))
    query = usage.parse_query(dict(request.query_params), own_key)
    records, cursor = await usage.records(gateway.store, query)
    return JSON({"records": records, "next": cursor})


async def usage_totals(request: Request) -> Response:
    """GET /usage/totals?period=day|month&key=&since=&until=: per key and model."""
    gateway: Gateway = request.app.state.gateway
    own_key = await _usage_caller(gateway, bearer(request))
    params = request.query_params
    key = params.get("key") or own_key
    if own_key is not None and key != own_key:
        raise Forbidden("key: a key can read only its own usage")
    found = await usage.totals(
        gateway.store,
        [key] if key else None,
        params.get("period", "month"),
        params.get("since", ""),
        params.get("until", "\uffff"),
    )
    return JSON({"totals": found})


async def _usage_caller(gateway: Gateway, token: str) -> str | None:
    """None for the admin; a gateway key's id for a key (which sees only its own usage)."""
    try:
        await gateway.admin.check(token)
    except Unauthorized:
        key_id, _ = await keys.authenticate(gateway.store, token)
        return key_id
    return None


def _known_model(gateway: Gateway, request: Request) -> str:
    model: str = request.path_params["model"]
    if model not in gateway.config.models:
        raise NotFound(f"the model {model!r} does not exist", code="model_not_found")
    return model
