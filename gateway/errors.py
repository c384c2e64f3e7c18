"""Every error the gateway raises, and the HTTP answer each one becomes.

    GatewayError                      base; carries status, type, code, message
    ├── BadRequest              400   a malformed request; the message names the field
    ├── Unauthorized            401   missing, unknown or revoked key
    ├── SpendCapReached         402   a monthly or lifetime cap would be exceeded
    ├── Forbidden               403   the caller may not do this
    │   └── ModelNotAllowed           the key may not use this model
    ├── NotFound                404   unknown model, key, template or route
    ├── RequestTimeout          408   the body did not arrive in time
    ├── PayloadTooLarge         413   body over the configured limit
    ├── RateLimited             429   the key's 60 s window is full
    ├── UpstreamRejected      4xx     a provider refused the request as the client's error
    ├── AllRoutesFailed         502   every route of the model failed
    ├── GatewayTimeout          504   no route answered within the request timeout
    └── StoreUnavailable        503   Redis cannot be reached

    ProviderFailure                   one route failed in a way that allows fallback
                                      (connection, timeout, 5xx, 429, 401/403, bad answer)

    ConfigError                       the config file is refused at start

Redis and HTTP client exceptions are mapped to these at one boundary each
(`gateway.store` and `gateway.providers`) with `raise ... from exc`.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class SpendCapReached(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "spend_cap_reached"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"connection": "close"}  # the rest of a slow body must not hold the connection


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"

    def headers(self) -> dict[str, str]:
        return {"connection": "close"}  # nor the rest of a body too large to read


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: int, reset_ms: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.reset_ms = reset_ms

    def headers(self) -> dict[str, str]:
        return {
            "retry-after": str(max(1, -(-self.reset_ms // 1000))),
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": f"{self.reset_ms / 1000:.3f}s",
        }


class UpstreamRejected(GatewayError):
    """A provider's 400/404/422: the client's error, returned as the provider said it."""

    type = "invalid_request_error"
    code = "upstream_rejected"

    def __init__(self, provider: str, status: int, message: str) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.status = status


class AllRoutesFailed(GatewayError):
    status = 502
    type = "upstream_error"
    code = "all_routes_failed"


class GatewayTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class StoreUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "store_unavailable"
    # False when the call is known never to have reached the store (no connection could
    # be made), so there is nothing of it to undo.
    may_have_run = True


class ProviderFailure(Exception):
    """One route failed in a way that moves on to the next route."""

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason


class ConfigError(Exception):
    """The config file is refused; the message names the file, the key and the problem."""
