"""GET /openapi.json: an OpenAPI 3.1 description of every endpoint, built once at import.

Request bodies are the JSON schemas of the very pydantic models the endpoints validate
with, so the description cannot drift from what the gateway accepts.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.admin import PriceSpec
from gateway.api.prompts import Activation, NewVersion, Rendering
from gateway.keys import KeySpec
from gateway.schema import ChatRequest, NativeRequest

Schema = dict[str, Any]

API = "/api/ai-gateway"
_REF = "#/components/schemas/{model}"
_BODIES: tuple[type[BaseModel], ...] = (
    ChatRequest, NativeRequest, KeySpec, PriceSpec, NewVersion, Activation, Rendering,
)  # fmt: skip
_REASONS = {
    400: "malformed request; the message names the field",
    401: "missing, unknown or revoked key",
    402: "spend cap reached",
    403: "not allowed for this key",
    404: "unknown model, key or prompt",
    408: "the body did not arrive in time",
    413: "body over the limit",
    429: "rate limited",
    502: "every route failed",
    503: "store unavailable",
    504: "no route answered within the request timeout",
}
_CLIENT = (400, 401, 408, 413, 503)
_ADMIN = (400, 401, 408, 413, 503)
_COMPLETION = (*_CLIENT, 402, 403, 404, 429, 502, 504)


def _ref(name: str) -> Schema:
    return {"$ref": _REF.format(model=name)}


def _obj(required: list[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": properties}


_NUMBER: Schema = {"type": "number"}
_INT: Schema = {"type": "integer"}
_STR: Schema = {"type": "string"}
_BOOL: Schema = {"type": "boolean"}

_RESPONSES: dict[str, Schema] = {
    "Error": _obj(
        ["error"], error=_obj(["message", "type", "code"], message=_STR, type=_STR, code=_STR)
    ),
    "ChatCompletion": _obj(
        ["id", "object", "model", "choices"],
        id=_STR, object=_STR, created=_INT, model=_STR,
        choices={"type": "array", "items": {"type": "object"}},
        usage={"type": ["object", "null"]},
    ),
    "NativeResponse": _obj(
        ["content", "model", "provider", "input_tokens", "output_tokens", "cached", "cost"],
        content=_STR, model=_STR, provider=_STR, input_tokens=_INT, output_tokens=_INT,
        cached=_BOOL, cost=_NUMBER,
    ),
    "ModelList": _obj(
        ["object", "data"],
        object={"const": "list"},
        data={"type": "array", "items": _obj(["id", "object"], id=_STR, object=_STR)},
    ),
    "KeyRecord": _obj(
        ["id", "name", "allowed_models", "rate_per_min", "monthly_cap", "hard_cap", "spend",
         "spend_month", "created_at", "revoked"],
        id=_STR, name=_STR, allowed_models={"type": "array", "items": _STR},
        rate_per_min=_INT, monthly_cap=_NUMBER, hard_cap=_NUMBER, spend=_NUMBER,
        spend_month=_NUMBER, reserved=_NUMBER, created_at=_INT, revoked=_BOOL,
    ),
    "UsageTotal": _obj(
        ["key_id", "model", "requests", "input_tokens", "output_tokens", "cost"],
        key_id=_STR, model=_STR, day=_STR, month=_STR, requests=_INT, input_tokens=_INT,
        output_tokens=_INT, cost=_NUMBER, cost_nano=_INT,
    ),
    "Price": _obj(["input_per_1k", "output_per_1k"], input_per_1k=_NUMBER, output_per_1k=_NUMBER),
    "UsageRecord": _obj(
        ["id", "key_id", "model", "provider", "input_tokens", "output_tokens", "cost",
         "cached", "at"],
        id=_STR, request_id=_STR, key_id=_STR, model=_STR, provider=_STR,
        input_tokens=_INT, output_tokens=_INT, cost=_NUMBER, cost_nano=_INT, cached=_BOOL,
        prompt=_STR, prompt_version=_INT, at=_STR,
    ),
}  # fmt: skip


def _components() -> Schema:
    _, defs = models_json_schema([(m, "validation") for m in _BODIES], ref_template=_REF)
    return {
        "schemas": {**defs["$defs"], **_RESPONSES},
        "securitySchemes": {
            "gatewayKey": {"type": "http", "scheme": "bearer", "description": "sk-gw-... key"},
            "adminKey": {"type": "http", "scheme": "bearer", "description": "the admin key"},
        },
    }


def _json(schema: Schema, description: str = "OK") -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(
    operation_id: str,
    summary: str,
    *,
    ok: Schema,
    errors: tuple[int, ...] = (),
    status: int = 200,
    body: str | None = None,
    example: Schema | None = None,
    security: tuple[str, ...] = (),
    parameters: list[Schema] | None = None,
) -> Schema:
    responses = {str(status): ok} | {
        str(code): _json(_ref("Error"), _REASONS[code]) for code in sorted(set(errors))
    }
    operation: Schema = {"operationId": operation_id, "summary": summary, "responses": responses}
    if security:
        operation["security"] = [{name: []} for name in security]
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        media: Schema = {"schema": _ref(body)}
        if example is not None:
            media["example"] = example
        operation["requestBody"] = {"required": True, "content": {"application/json": media}}
    return operation


def _path_param(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, description: str, schema: Schema | None = None) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema or _STR,
            "description": description}  # fmt: skip


_KEY_ID = [_path_param("key_id", _STR)]
_MODEL = [_path_param("model", _STR)]
_PROMPT = [_path_param("name", {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,128}$"})]
_CHAT_HEADERS = [
    {"name": "cache-control", "in": "header", "required": False, "schema": _STR},
    {"name": "x-request-id", "in": "header", "required": False, "schema": _STR},
]
_HELLO = {"model": "mock-echo", "messages": [{"role": "user", "content": "hello"}]}
_KEY = ("gatewayKey",)
_ADMIN_KEY = ("adminKey",)


def _chat() -> Schema:
    ok = _json(_ref("ChatCompletion"))
    ok["content"]["text/event-stream"] = {"schema": _STR}
    return {
        "post": _operation(
            "chatCompletions", "OpenAI chat completions; `stream: true` is SSE",
            ok=ok, errors=_COMPLETION, body="ChatRequest", example=_HELLO,
            security=_KEY, parameters=_CHAT_HEADERS,
        )
    }  # fmt: skip


def _admin_paths() -> dict[str, Schema]:
    return {**_key_paths(), **_price_paths(), **_usage_paths()}


def _key_paths() -> dict[str, Schema]:
    record = _json(_ref("KeyRecord"))
    created = _json(_obj(["key", "record"], key=_STR, record=_ref("KeyRecord")), "Created")
    key_page = [
        _query("limit", "1 to 1000; absent: every key",
               {"type": "integer", "minimum": 1, "maximum": 1000}),
        _query("cursor", "the `next` of the previous page"),
    ]  # fmt: skip
    return {
        f"{API}/keys": {
            "post": _operation("createKey", "Mint a key; the raw key is in this answer only",
                               ok=created, status=201, errors=_ADMIN, body="KeySpec",
                               example={"name": "demo", "rate_per_min": 60},
                               security=_ADMIN_KEY),
            "get": _operation("listKeys", "Every key, no secrets; a page of them with limit",
                              security=_ADMIN_KEY, parameters=key_page,
                              ok=_json(_obj(["keys", "next"],
                                            keys={"type": "array", "items": _ref("KeyRecord")},
                                            next={"type": ["string", "null"]})),
                              errors=(400, 401, 503)),
        },
        f"{API}/keys/{{key_id}}": {
            "get": _operation("showKey", "One key with its spend", ok=record, parameters=_KEY_ID,
                              errors=(401, 404, 503), security=_ADMIN_KEY),
            "delete": _operation("revokeKey", "Revoke a key on every replica",
                                 ok=_json(_obj(["id", "revoked"], id=_STR, revoked=_BOOL)),
                                 parameters=_KEY_ID, errors=(401, 404, 503), security=_ADMIN_KEY),
        },
    }  # fmt: skip


def _price_paths() -> dict[str, Schema]:
    book = {"type": "object", "additionalProperties": _ref("Price")}
    prices = _json(_obj(["prices"], prices=book))
    price = _json({"allOf": [_obj(["model"], model=_STR), _ref("Price")]})
    return {
        f"{API}/prices": {
            "get": _operation("listPrices", "The price book", ok=prices, errors=(401, 503),
                              security=_ADMIN_KEY),
        },
        f"{API}/prices/{{model}}": {
            "get": _operation("showPrice", "One model's price", ok=price, parameters=_MODEL,
                              errors=(401, 404, 503), security=_ADMIN_KEY),
            "put": _operation("putPrice", "Override a price on every replica", ok=price,
                              parameters=_MODEL, errors=(*_ADMIN, 404), body="PriceSpec",
                              example={"input_per_1k": 0.001, "output_per_1k": 0.002},
                              security=_ADMIN_KEY),
        },
    }  # fmt: skip


def _usage_paths() -> dict[str, Schema]:
    usage = _json(_obj(["records", "next"], records={"type": "array", "items": _ref("UsageRecord")},
                       next={"type": ["string", "null"]}))  # fmt: skip
    totals = _json(_obj(["totals"], totals={"type": "array", "items": _ref("UsageTotal")}))
    totals_params = [
        _query("period", "day or month", {"enum": ["day", "month"]}),
        _query("key", "a key id (a key caller may name only its own)"),
        _query("since", "first day or month, as YYYY-MM-DD or YYYY-MM"),
        _query("until", "last day or month, as YYYY-MM-DD or YYYY-MM"),
    ]
    usage_params = [
        _query("key", "a key id (a key caller may name only its own)"),
        _query("since", "Unix seconds or ISO 8601"),
        _query("until", "Unix seconds or ISO 8601"),
        _query("limit", "1 to 1000", {"type": "integer", "minimum": 1, "maximum": 1000}),
        _query("cursor", "the `next` of the previous page"),
    ]
    return {
        f"{API}/usage": {
            "get": _operation("listUsage", "Usage records, newest first", ok=usage,
                              parameters=usage_params, errors=(400, 401, 403, 503),
                              security=("adminKey", "gatewayKey")),
        },
        f"{API}/usage/totals": {
            "get": _operation("usageTotals", "Totals per key and model, per day or month",
                              ok=totals, parameters=totals_params, errors=(400, 401, 403, 503),
                              security=("adminKey", "gatewayKey")),
        },
    }  # fmt: skip


def _prompt_paths() -> dict[str, Schema]:
    pushed = _json(_obj(["name", "version", "active"], name=_STR, version=_INT, active=_INT),
                   "Created")  # fmt: skip
    shown = _json(_obj(["name", "active", "versions"], name=_STR, active=_INT,
                       versions={"type": "array", "items": {"type": "object"}}))  # fmt: skip
    return {
        f"{API}/prompts": {
            "get": _operation("listPrompts", "Every template", security=_ADMIN_KEY,
                              ok=_json(_obj(["prompts"], prompts={"type": "array"})),
                              errors=(401, 503)),
        },
        f"{API}/prompts/{{name}}": {
            "post": _operation("pushPromptVersion", "Add a version", ok=pushed, status=201,
                               parameters=_PROMPT, errors=_ADMIN, body="NewVersion",
                               example={"template": "You are a support agent for {{ product }}."},
                               security=_ADMIN_KEY),
            "get": _operation("showPrompt", "All versions and the active one", ok=shown,
                              parameters=_PROMPT, errors=(400, 401, 404, 503),
                              security=_ADMIN_KEY),
        },
        f"{API}/prompts/{{name}}/activate": {
            "post": _operation("activatePrompt", "Make a version the active one",
                               ok=_json(_obj(["name", "active"], name=_STR, active=_INT)),
                               parameters=_PROMPT, errors=(*_ADMIN, 404), body="Activation",
                               example={"version": 1}, security=_ADMIN_KEY),
        },
        f"{API}/prompts/{{name}}/render": {
            "post": _operation("renderPrompt", "Render a version with variables",
                               ok=_json(_obj(["text", "version"], text=_STR, version=_INT)),
                               parameters=_PROMPT, errors=(*_ADMIN, 404), body="Rendering",
                               example={"variables": {"product": "Acme"}},
                               security=_ADMIN_KEY),
        },
    }  # fmt: skip


def _probe(operation_id: str, summary: str, errors: tuple[int, ...] = ()) -> Schema:
    ok = _json(_obj(["status"], status=_STR))
    return {"get": _operation(operation_id, summary, ok=ok, errors=errors)}


def build() -> Schema:
    """The whole document."""
    paths: dict[str, Schema] = {
        "/v1/chat/completions": _chat(),
        "/v1/models": {
            "get": _operation("listModels", "The models this key may use",
                              ok=_json(_ref("ModelList")), errors=(401, 503), security=_KEY),
        },
        f"{API}/complete": {
            "post": _operation("nativeComplete", "Native gated completion",
                               ok=_json(_ref("NativeResponse")), errors=_COMPLETION,
                               body="NativeRequest", example=_HELLO, security=_KEY),
        },
        **_admin_paths(),
        **_prompt_paths(),
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (key ids as labels, never keys)",
                "responses": {"200": {"description": "OK",
                                      "content": {"text/plain": {"schema": _STR}}}},
            }
        },
        "/healthz": _probe("healthz", "Liveness"),
        "/readyz": _probe("readyz", "Readiness: the store answers, scripts loaded", (503,)),
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ai-gateway",
            "version": "0.1.0",
            "description": 'Every error body is {"error": {"message", "type", "code"}}.',
        },
        "paths": paths,
        "components": _components(),
    }


DOCUMENT = orjson.dumps(build())


async def schema(request: Request) -> Response:
    return Response(DOCUMENT, media_type="application/json")
