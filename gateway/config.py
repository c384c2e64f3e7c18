"""The YAML configuration: providers, models with prices and routes, cache and limits.

A config is checked completely at start; any problem is a `ConfigError` naming the file,
the key and the problem, so a replica never starts half-configured.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import ConfigError

USD = Annotated[Decimal, Field(ge=0, max_digits=24, decimal_places=12)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CacheConfig(_Strict):
    ttl_seconds: int = Field(3600, ge=1)
    scope: Literal["key", "global"] = "key"
    enabled: bool = True


class ProviderConfig(_Strict):
    type: Literal["openai", "anthropic", "mock"]
    base_url: str | None = None
    api_key_env: str | None = None
    timeout_seconds: float = Field(60.0, gt=0, le=3600)


class Route(_Strict):
    provider: str
    model: str


class ModelConfig(_Strict):
    input_per_1k: USD
    output_per_1k: USD
    max_output_tokens: int = Field(4096, ge=1, le=1_000_000)
    # Input tokens reserved per image part; images are billed by pixels, not URL bytes.
    image_token_bound: int = Field(3000, ge=0, le=1_000_000)
    routes: list[Route] = Field(min_length=1)


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(1_048_576, ge=1024)
    request_timeout_seconds: float = Field(300.0, gt=0)
    # A reservation's lease is the request timeout plus this: the bound on how long a dead
    # worker's reservation holds capacity.
    lease_margin_seconds: float = Field(30.0, ge=0.5)
    usage_retention_days: int = Field(90, ge=1)
    # The request line and headers: their size, and how long they may take to arrive once
    # the first byte has (a slow client holds a connection no longer than this).
    max_header_bytes: int = Field(32_768, ge=1024, le=16_777_216)
    header_timeout_seconds: float = Field(10.0, gt=0, le=3600)
    max_template_bytes: int = Field(65_536, ge=1)
    max_variables_bytes: int = Field(65_536, ge=1)


class StoreConfig(_Strict):
    # Replicas that must acknowledge each admission and settlement (Redis WAIT), so a
    # failover cannot lose a reservation or a charge; 0 trusts asynchronous replication.
    wait_replicas: int = Field(0, ge=0, le=16)
    wait_timeout_ms: int = Field(100, ge=1, le=60_000)


class MetricsConfig(_Strict):
    # A key-id label on spend; turn off for fleets with more keys than a TSDB should hold.
    per_key_labels: bool = True


class Config(_Strict):
    store: StoreConfig = StoreConfig()
    metrics: MetricsConfig = MetricsConfig()
    cache: CacheConfig = CacheConfig()
    limits: LimitsConfig = LimitsConfig()
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _routes_name_known_providers(self) -> Config:
        for name, model in self.models.items():
            for i, route in enumerate(model.routes):
                if route.provider not in self.providers:
                    raise ValueError(
                        f"models.{name}.routes.{i}.provider: unknown provider {route.provider!r}"
                    )
        return self

    @model_validator(mode="after")
    def _remote_providers_have_a_url(self) -> Config:
        for name, provider in self.providers.items():
            if provider.type != "mock" and not provider.base_url:
                raise ValueError(f"providers.{name}.base_url: required for type {provider.type}")
        return self


BUILTIN: dict[str, Any] = {
    "providers": {"mock": {"type": "mock"}},
    "models": {
        "mock-echo": {
            "input_per_1k": "0.001",
            "output_per_1k": "0.002",
            "max_output_tokens": 4096,
            "routes": [{"provider": "mock", "model": "mock-echo"}],
        }
    },
}


def parse(raw: Any, source: str) -> Config:
    """Validate a decoded YAML document; errors name `source`, the key and the problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc


def _describe(err: Any) -> str:
    where = ".".join(str(part) for part in err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    if message.startswith(f"{where}:") or not where:
        return message
    return f"{where}: {message}"


def load(path: str | None = None) -> Config:
    """Load the file at `path` (or `GATEWAY_CONFIG`), or the built-in mock config."""
    path = path or os.environ.get("GATEWAY_CONFIG")
    if not path:
        return parse(BUILTIN, "built-in config")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(raw, path)
