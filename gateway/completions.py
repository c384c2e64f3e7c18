"""One completion, from a validated body to a settled bill.

    prepare  validate, resolve the model, bound the tokens, price the worst case
    admit    one script call (and, alongside it, the cache lookup)
    serve    a cache hit, or the routes in order
    settle   one script call: actual cost, usage record, reservation released

A plain completion is settled once its response is written (`Result.settle`, run by the
endpoint after the body): the client does not wait for that round trip, and until it
lands the reservation, never less than the charge, holds the key's capacity, so caps
hold throughout. Whatever happens between admit and settle (a provider failure, a
client that leaves, a timeout), the reservation is settled or released: see
`Relay.finish` and the `except BaseException` below.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from gateway.admission import CacheWrite, Gate, Ticket
from gateway.cache import Cache, Entry
from gateway.config import Config
from gateway.errors import GatewayTimeout, NotFound, ProviderFailure
from gateway.plan import Plan
from gateway.prices import PriceBook
from gateway.prompts import Prompts
from gateway.routing import Router, Stream
from gateway.schema import ChatRequest, check
from gateway.streams import DONE, Assembler, replay, sse

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Result:
    body: dict[str, Any]
    provider: str
    input_tokens: int
    output_tokens: int
    cost: int
    cached: bool
    upstream_seconds: float
    settle: Callable[[], Awaitable[None]]  # to run once the response is written


class Completions:
    def __init__(
        self,
        config: Config,
        gate: Gate,
        cache: Cache,
        prices: PriceBook,
        router: Router,
        prompts: Prompts,
    ) -> None:
        self.config = config
        self.prompts = prompts
        self.gate = gate
        self.cache = cache
        self.prices = prices
        self.router = router
        self.inline_cache = cache.inline(gate.store)
        self.deadline = config.limits.request_timeout_seconds

    async def plan(
        self,
        body: dict[str, Any],
        key_id: str,
        cache_control: tuple[bool, bool],
        request_id: str,
    ) -> Plan:
        check(ChatRequest, body)
        model = body["model"]
        settings = self.config.models.get(model)
        if settings is None:
            raise NotFound(f"the model {model!r} does not exist", code="model_not_found")
        record: dict[str, Any] = {"model": model, "request_id": request_id}
        body = await self._with_prompt(body, record)
        plan = Plan.of(body, model, settings, self.prices[model])
        plan.record = record
        lookup, write = cache_control
        if self.config.cache.enabled and (lookup or write):
            plan.cache_key = self.cache.key_for(body, key_id)
            plan.lookup, plan.cache_write = lookup, write
        return plan

    async def _with_prompt(self, body: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        """The body with its `prompt` rendered into the first message (before any money)."""
        ref = body.get("prompt")
        body = {k: v for k, v in body.items() if k != "prompt"}
        if ref is None:
            return body
        text, version = await self.prompts.render(
            ref["name"], ref.get("version"), ref.get("variables") or {}
        )
        body["messages"] = [{"role": ref.get("role", "system"), "content": text}, *body["messages"]]
        record |= {"prompt": ref["name"], "prompt_version": version}
        return body

    async def admit(self, raw_key: str, plan: Plan) -> tuple[Ticket, Entry | None]:
        # The reservation id is ours, never the client's x-request-id: a client that reused
        # an id must not be able to pass as a replay of an admitted request.
        reservation_id = secrets.token_hex(16)
        # One deadline from admission on, shorter than the reservation's lease.
        plan.deadline = asyncio.get_running_loop().time() + self.deadline
        lookup = plan.cache_key if plan.lookup else None
        if lookup and self.inline_cache:
            ticket = await self.gate.admit(
                raw_key, plan.model, reservation_id, plan.reservation, cache_key=lookup
            )
            raw = ticket.cache_entry
            return ticket, Cache.decode(raw, lookup) if raw else None
        admission = self.gate.admit(raw_key, plan.model, reservation_id, plan.reservation)
        if lookup is None:
            return await admission, None
        ticket, hit = await asyncio.gather(admission, self.cache.get(lookup))
        return ticket, hit

    async def complete(self, plan: Plan, ticket: Ticket, hit: Entry | None) -> Result:
        if hit is not None:
            record = self._record(plan, ticket, hit.provider, 0, 0, True)
            settle = self._settlement(plan, ticket, 0, record, None)
            body = {**hit.body, "model": plan.model}
            tokens = hit.input_tokens, hit.output_tokens
            return Result(body, hit.provider, *tokens, 0, True, 0.0, settle)
        started = time.perf_counter()
        async with self._serving(plan, ticket):
            served = await self.router.complete(plan.model, plan.body)
        waited = time.perf_counter() - started
        done = served.completion
        charge = plan.charge(done.input_tokens, done.output_tokens)
        record = self._record(
            plan, ticket, served.provider, done.input_tokens, done.output_tokens, False
        )
        body = {**done.body, "model": plan.model}
        entry = Entry(body, served.provider, done.input_tokens, done.output_tokens)
        settle = self._settlement(plan, ticket, charge, record, entry)
        tokens = done.input_tokens, done.output_tokens
        return Result(body, served.provider, *tokens, charge, False, waited, settle)

    def _settlement(
        self, plan: Plan, ticket: Ticket, charge: int, record: dict[str, Any], entry: Entry | None
    ) -> Callable[[], Awaitable[None]]:
        async def settle() -> None:
            try:
                # Cut mid-settlement (a forced shutdown), the gate finishes it in the
                # background, as a shield would, without a task per request.
                await self.settle_served(plan, ticket, charge, record, entry)
            except Exception:  # the response is out: log, never raise into the server
                log.exception("settlement of %s failed", ticket.reservation_id)

        return settle

    async def open_stream(self, plan: Plan, ticket: Ticket, hit: Entry | None) -> Relay:
        if hit is not None:
            return Relay(self, plan, ticket, hit=hit)
        started = time.perf_counter()
        async with self._serving(plan, ticket):
            stream = await self.router.stream(plan.model, plan.body)
        stream.opened = started
        return Relay(self, plan, ticket, stream=stream)

    async def settle_served(
        self, plan: Plan, ticket: Ticket, charge: int, record: dict[str, Any], entry: Entry | None
    ) -> None:
        """Settle, and store the response for the cache: in the same script call when the
        cache lives beside the key's state, else with one more command."""
        cache_key = plan.cache_key if plan.cache_write and entry is not None else None
        if cache_key and entry and self.inline_cache:
            write = CacheWrite(cache_key, Cache.encode(entry), self.config.cache.ttl_seconds)
            await self.gate.settle(ticket, charge, record, write)
            return
        await self.gate.settle(ticket, charge, record)
        if cache_key and entry:
            await self.cache.put(cache_key, entry)

    @asynccontextmanager
    async def _serving(self, plan: Plan, ticket: Ticket) -> AsyncIterator[None]:
        """Until a provider answers: bounded by the deadline; on any failure, release."""
        try:
            async with asyncio.timeout_at(plan.deadline):
                yield
        except BaseException as exc:
            await asyncio.shield(self.gate.release(ticket))
            if isinstance(exc, TimeoutError):
                raise GatewayTimeout("no route answered within the request timeout") from exc
            raise

    def _record(
        self,
        plan: Plan,
        ticket: Ticket,
        provider: str,
        input_tokens: int,
        output_tokens: int,
        cached: bool,
    ) -> dict[str, Any]:
        return {
            **plan.record,
            "provider": provider,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cached": int(cached),
        }


class Relay:
    """One streamed completion in flight; `finish` settles it exactly once."""

    def __init__(
        self,
        owner: Completions,
        plan: Plan,
        ticket: Ticket,
        *,
        stream: Stream | None = None,
        hit: Entry | None = None,
    ) -> None:
        self.owner = owner
        self.plan = plan
        self.ticket = ticket
        self.stream = stream
        self.hit = hit
        self.provider = stream.provider if stream else (hit.provider if hit else "")
        self.assembler = Assembler()
        self.complete = False
        self.cost = 0
        self.tokens = (0, 0)
        self.upstream_seconds = 0.0
        self._finished = False

    async def events(self) -> AsyncIterator[bytes]:
        if self.hit is not None:
            for chunk in replay(
                {**self.hit.body, "model": self.plan.model}, self.plan.include_usage
            ):
                yield sse(chunk)
            self.complete = True
            yield DONE
            return
        assert self.stream is not None
        try:
            async with asyncio.timeout_at(self.plan.deadline):
                async for chunk in self.stream.chunks:
                    self.assembler.add(chunk)
                    shown = self._shown(chunk)
                    if shown is not None:
                        yield sse(shown)
        except (ProviderFailure, TimeoutError) as exc:
            reason = "the request timeout passed" if isinstance(exc, TimeoutError) else exc
            log.warning("stream from %s cut: %s", self.provider, reason)
            message = f"upstream stream failed: {reason}"
            error = {"message": message, "type": "upstream_error", "code": "stream_interrupted"}
            yield sse({"error": error})
            return
        self.complete = True
        yield DONE

    def _shown(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk as the client sees it: our model name, usage only if it asked."""
        chunk["model"] = self.plan.model
        if self.plan.include_usage:
            return chunk
        if not chunk.get("choices") and chunk.get("usage"):
            return None
        chunk.pop("usage", None)
        return chunk

    async def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self.hit is not None:
            record = self.owner._record(self.plan, self.ticket, self.provider, 0, 0, True)
            await self.owner.gate.settle(self.ticket, 0, record)
            return
        assert self.stream is not None
        input_tokens, output_tokens = self._used()
        self.tokens = input_tokens, output_tokens
        self.upstream_seconds = time.perf_counter() - self.stream.opened
        self.cost = self.plan.charge(input_tokens, output_tokens)
        record = self.owner._record(
            self.plan, self.ticket, self.provider, input_tokens, output_tokens, False
        )
        entry = None
        if self.complete:
            try:
                body = {**self.assembler.completion(), "model": self.plan.model}
                entry = Entry(body, self.provider, input_tokens, output_tokens)
            except Exception:  # settlement must happen; an unassemblable stream is not cached
                log.exception("stream from %s could not be assembled for the cache", self.provider)
        await self.owner.settle_served(self.plan, self.ticket, self.cost, record, entry)

    def _used(self) -> tuple[int, int]:
        """Reported usage; failing that, the bounds: what was reserved is what is charged."""
        assert self.stream is not None
        usage = self.stream.usage
        reported = self.complete and usage.output_tokens is not None
        input_tokens = (
            usage.input_tokens if usage.input_tokens is not None else self.plan.input_bound
        )
        if reported:
            return input_tokens, usage.output_tokens or 0
        return input_tokens, min(usage.output_bytes, self.plan.output_bound)
