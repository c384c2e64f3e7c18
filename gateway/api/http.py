"""Request and response plumbing shared by every endpoint."""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import GatewayError, PayloadTooLarge, RequestTimeout, Unauthorized

# A client gets this long to send its body; a slow one must not hold a worker's slot.
BODY_SECONDS = 30
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> JSON:
    return JSON(exc.body(), status_code=exc.status, headers={**exc.headers(), **(headers or {})})


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    return token.strip()


def request_id(request: Request) -> str:
    """The client's x-request-id when it is sane, else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else "req_" + secrets.token_hex(12)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes, 408 if it dawdles."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise RequestTimeout(f"the request body did not arrive within {BODY_SECONDS} s") from exc
    return b"".join(chunks)
