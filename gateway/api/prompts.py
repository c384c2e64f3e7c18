"""The admin API for prompt templates."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.admin import admin_gateway
from gateway.api.http import JSON, read_body
from gateway.schema import check, decode


class NewVersion(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    template: str


class Activation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    version: Annotated[int, Field(ge=1)]


class Rendering(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    variables: dict[str, Any] = Field(default_factory=dict)
    version: Annotated[int, Field(ge=1)] | None = None


async def _body(request: Request, model: type[BaseModel], limit: int) -> Any:
    return check(model, decode(await read_body(request, limit)))


async def list_prompts(request: Request) -> Response:
    gateway = await admin_gateway(request)
    return JSON({"prompts": await gateway.prompts.listing()})


async def push_version(request: Request) -> Response:
    gateway = await admin_gateway(request)
    limit = gateway.config.limits.max_template_bytes * 2 + 1024  # JSON escaping can double it
    body: NewVersion = await _body(request, NewVersion, limit)
    name = request.path_params["name"]
    version, active = await gateway.prompts.push(name, body.template)
    return JSON({"name": name, "version": version, "active": active}, status_code=201)


async def show_prompt(request: Request) -> Response:
    gateway = await admin_gateway(request)
    return JSON(await gateway.prompts.show(request.path_params["name"]))


async def activate(request: Request) -> Response:
    gateway = await admin_gateway(request)
    body: Activation = await _body(request, Activation, 4096)
    name = request.path_params["name"]
    await gateway.prompts.activate(name, body.version)
    return JSON({"name": name, "active": body.version})


async def render(request: Request) -> Response:
    gateway = await admin_gateway(request)
    limit = gateway.config.limits.max_variables_bytes * 2 + 4096
    body: Rendering = await _body(request, Rendering, limit)
    text, version = await gateway.prompts.render(
        request.path_params["name"], body.version, body.variables
    )
    return JSON({"text": text, "version": version})
