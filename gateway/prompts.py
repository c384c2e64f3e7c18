"""Prompt templates: named, with immutable numbered versions, kept in Redis.

Syntax: `{{name}}` or `{{ name }}` is replaced by the variable `name`; `\\{{` is a literal
`{{`; any other `{{` is refused when the version is pushed, so a template that renders
wrongly never reaches a completion. Missing variables are a 400 naming every one of them;
extra variables are ignored.

Versions never change once written, so each worker keeps parsed versions in memory; which
version is active is read from Redis on every use, so an activation is seen by every
replica at its next request.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from gateway.config import LimitsConfig
from gateway.errors import BadRequest, NotFound
from gateway.keys import members
from gateway.store import Store

INDEX = "gw:prompts"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_TOKEN = re.compile(r"\\\{\{|\{\{\s*([A-Za-z_][A-Za-z0-9_.-]{0,127})\s*\}\}|\{\{")
_PARSED_VERSIONS = 1024


@dataclass(frozen=True, slots=True)
class Template:
    parts: tuple[str | tuple[str], ...]  # literal text, or (variable name,)

    @classmethod
    def parse(cls, text: str) -> Template:
        parts: list[str | tuple[str]] = []
        position = 0
        for match in _TOKEN.finditer(text):
            parts.append(text[position : match.start()])
            position = match.end()
            if match.group(0) == "\\{{":
                parts.append("{{")
            elif match.group(1):
                parts.append((match.group(1),))
            else:
                raise BadRequest(
                    f"template: '{{{{' at offset {match.start()} opens no variable; "
                    "write \\{{ for a literal '{{'"
                )
        parts.append(text[position:])
        return cls(tuple(p for p in parts if p))

    @property
    def variables(self) -> list[str]:
        return list(dict.fromkeys(p[0] for p in self.parts if isinstance(p, tuple)))

    def render(self, values: dict[str, Any]) -> str:
        missing = [name for name in self.variables if name not in values]
        if missing:
            raise BadRequest(f"prompt.variables: missing {', '.join(missing)}")
        return "".join(p if isinstance(p, str) else _text(values[p[0]], p[0]) for p in self.parts)


def _text(value: Any, name: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise BadRequest(f"prompt.variables.{name}: must be a string, number or boolean")


def _slots(name: str) -> tuple[str, str]:
    return f"gw:prompt:{{{name}}}:meta", f"gw:prompt:{{{name}}}:versions"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise BadRequest("name: 1 to 128 letters, digits, '_', '-' or '.'")
    return name


class Prompts:
    def __init__(self, store: Store, limits: LimitsConfig) -> None:
        self.store = store
        self.limits = limits
        self._parsed: OrderedDict[tuple[str, int], Template] = OrderedDict()

    async def push(self, name: str, text: str) -> tuple[int, int]:
        """Add a version; returns (its number, the active number)."""
        check_name(name)
        if len(text.encode()) > self.limits.max_template_bytes:
            raise BadRequest(f"template: over the limit of {self.limits.max_template_bytes} bytes")
        Template.parse(text)
        push_id = secrets.token_hex(16)  # a resend of this push is recognised by it
        version, active = await self.store.run(
            "add_prompt_version", list(_slots(name)), [text, push_id]
        )
        await self.store.call(lambda: self.store.redis.sadd(INDEX, name))
        return int(version), int(active)

    async def activate(self, name: str, version: int) -> None:
        meta, versions = _slots(check_name(name))

        async def write() -> bool:
            if not await self.store.redis.hexists(versions, str(version)):
                return False
            await self.store.redis.hset(meta, "active", version)
            return True

        if not await self.store.call(write):
            await self._known(name)
            raise NotFound(f"prompt {name!r} has no version {version}", code="version_not_found")

    async def show(self, name: str) -> dict[str, Any]:
        meta, versions = await self._read(check_name(name))
        listed = [
            {"version": int(v), "template": text, "created_at": int(meta.get(f"created:{v}", 0))}
            for v, text in sorted(versions.items(), key=lambda item: int(item[0]))
        ]
        return {"name": name, "active": int(meta["active"]), "versions": listed}

    async def listing(self) -> list[dict[str, Any]]:
        found = []
        for name in await members(self.store, INDEX):
            meta, _ = await self._read(name)
            found.append(
                {"name": name, "active": int(meta["active"]), "latest": int(meta["latest"])}
            )
        return found

    async def render(
        self, name: str, version: int | None, values: dict[str, Any]
    ) -> tuple[str, int]:
        """The rendered text and the version used (the active one unless `version` is given)."""
        size = sum(len(str(v).encode()) for v in values.values())
        if size > self.limits.max_variables_bytes:
            raise BadRequest(
                f"prompt.variables: over the limit of {self.limits.max_variables_bytes} bytes"
            )
        version, template = await self._template(check_name(name), version)
        return template.render(values), version

    async def _template(self, name: str, version: int | None) -> tuple[int, Template]:
        meta, versions = _slots(name)
        if version is None:
            active = await self.store.call(lambda: self.store.redis.hget(meta, "active"))
            if active is None:
                raise NotFound(f"no prompt named {name!r}", code="prompt_not_found")
            version = int(active)
        cached = self._parsed.get((name, version))
        if cached is not None:
            return version, cached
        text = await self.store.call(lambda: self.store.redis.hget(versions, str(version)))
        if text is None:
            await self._known(name)
            raise NotFound(f"prompt {name!r} has no version {version}", code="version_not_found")
        template = self._remember(name, version, Template.parse(str(text)))
        return version, template

    def _remember(self, name: str, version: int, template: Template) -> Template:
        self._parsed[(name, version)] = template
        if len(self._parsed) > _PARSED_VERSIONS:
            self._parsed.popitem(last=False)
        return template

    async def _read(self, name: str) -> tuple[dict[str, str], dict[str, str]]:
        meta_key, versions_key = _slots(name)

        async def read() -> tuple[dict[str, str], dict[str, str]]:
            async with self.store.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(meta_key)
                pipe.hgetall(versions_key)
                meta, versions = await pipe.execute()
            return meta, versions

        meta, versions = await self.store.call(read)
        if not meta:
            raise NotFound(f"no prompt named {name!r}", code="prompt_not_found")
        return meta, versions

    async def _known(self, name: str) -> None:
        if not await self.store.call(lambda: self.store.redis.exists(_slots(name)[0])):
            raise NotFound(f"no prompt named {name!r}", code="prompt_not_found")
