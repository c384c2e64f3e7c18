"""Admission and settlement: the two Redis round trips of every completion.

`admit` runs `admit_request.lua`: key, revocation, model, sliding window and the spend
reservation in one atomic call; the share of the key's cap in use that it reports, on
admission and on a 402 alike, goes to the `gateway_key_cap_used_ratio` gauge. `settle`
runs `settle_request.lua`: the actual cost replaces the reservation and the usage record
is written. Both are keyed by the request id, so a call retried after a timeout can
never reserve or charge twice.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from gateway import metrics
from gateway.errors import (
    ModelNotAllowed,
    RateLimited,
    SpendCapReached,
    StoreUnavailable,
    Unauthorized,
)
from gateway.keys import Slots, identify
from gateway.money import to_usd
from gateway.store import Store

log = logging.getLogger(__name__)

ADMITTED, UNKNOWN, REVOKED, NOT_ALLOWED, RATE_LIMITED, MONTHLY_CAP, HARD_CAP = range(7)
# A settled reservation id is remembered this long from the first attempt that lands
# (the settled mark), so a retried settlement is a no-op; it bounds a key's bookkeeping
# in Redis to its request rate times this. Any attempt whose answer was lost may have
# landed, and one landing once the first's mark is gone would charge again. So every
# attempt carries a bound in Redis time, the mark's life less a margin for the two
# clocks, past which the script refuses to charge a reservation it no longer knows (a
# command delivered late, after a partition); and retries stop while what they send
# would still land inside it (see `Gate._settle_later`).
SETTLED_MARK_MS = 60 * 1000
CLOCK_MARGIN_MS = 1000
_SETTLE_RETRY_SECONDS = (0.05, 0.2, 1.0, 2.0, 5.0, 10.0, 20.0)  # pauses before retries


@dataclass(frozen=True, slots=True)
class CacheWrite:
    """A response to store in the settlement call: key under the key's hash tag."""

    key: str
    entry: bytes  # msgpack
    ttl_seconds: int


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request: what was reserved, and the window headers to send back."""

    key_id: str
    reservation_id: str
    reserved: int  # nano-USD
    limit: int
    remaining: int
    reset_ms: int
    cache_entry: bytes | None = None  # read by admission when asked
    # Redis time minus event-loop time when admission answered, µs (None: not admitted
    # here): with it, a loop time gives a lower bound of Redis time then.
    clock_offset_us: int | None = None


class Gate:
    def __init__(
        self, store: Store, *, lease_ms: int, retention_ms: int, key_labels: bool = True
    ) -> None:
        self.store = store
        self.lease_ms = lease_ms
        self.retention_ms = retention_ms
        self.key_labels = key_labels  # False: no per-key cap gauge (metrics.per_key_labels)
        self._retries: set[asyncio.Task[None]] = set()

    async def admit(
        self,
        raw_key: str,
        model: str,
        reservation_id: str,
        amount: int,
        cache_key: str | None = None,
    ) -> Ticket:
        """Admit and reserve; with `cache_key` (under the key's hash tag), also read the
        cached response in the same call, into `Ticket.cache_entry`."""
        key_id, digest = identify(raw_key)
        slots = Slots.of(key_id)
        keys = [slots.record, slots.window, slots.spend, slots.resv, slots.lease]
        if cache_key:
            keys.append(cache_key)
        args = [digest, model, reservation_id, amount, self.lease_ms]
        try:
            answer = await self.store.run("admit_request", keys, args)
        except StoreUnavailable as exc:
            # The call may have run before its answer was lost: release that reservation
            # id (a no-op if it never ran) rather than hold the capacity for a lease. Not
            # when it never left: a store refusing connections under load would gather
            # a retrying task per refused request.
            if exc.may_have_run:
                self.settle_later(Ticket(key_id, reservation_id, amount, 0, 0, 0), 0, None)
            raise
        status, limit, remaining, reset_ms, detail, cap_used_ppm = answer[:6]
        if cap_used_ppm >= 0 and self.key_labels:
            metrics.child(metrics.KEY_CAP_USED, key_id).set(cap_used_ppm / 1_000_000)
        if status == ADMITTED:
            metrics.OPEN_RESERVATIONS.inc()
            entry = answer[6] or None
            offset = answer[7] - int(asyncio.get_running_loop().time() * 1_000_000)
            return Ticket(key_id, reservation_id, amount, limit, remaining, reset_ms, entry, offset)
        raise _refusal(status, model, limit, reset_ms, detail.decode())

    async def settle(
        self,
        ticket: Ticket,
        cost: int,
        record: dict[str, Any] | None,
        cache: CacheWrite | None = None,
    ) -> None:
        """Settle now (storing `cache` in the same call); if the store is away, or the
        call is cut (a forced shutdown), keep retrying in the background."""
        metrics.OPEN_RESERVATIONS.dec()
        first = asyncio.get_running_loop().time()
        try:
            await self._settle(ticket, cost, record, _valid_until(ticket, first), cache)
        except StoreUnavailable:
            log.warning("settlement of %s deferred: store unavailable", ticket.reservation_id)
            self.settle_later(ticket, cost, record, first)
        except asyncio.CancelledError:
            self.settle_later(ticket, cost, record, first)
            raise

    def settle_later(
        self, ticket: Ticket, cost: int, record: dict[str, Any] | None, first: float | None = None
    ) -> None:
        """Settle in the background, retrying while the store is away (idempotent: a
        settlement that did land is not applied twice). `first`: when the first attempt
        was sent, if one was (event-loop time)."""
        if first is None:
            first = asyncio.get_running_loop().time()
        task = asyncio.create_task(self._settle_later(ticket, cost, record, first))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def release(self, ticket: Ticket) -> None:
        """Give the reservation back with no charge and no record (no provider served it)."""
        await self.settle(ticket, 0, None)

    async def drain(self) -> None:
        if self._retries:
            await asyncio.gather(*self._retries, return_exceptions=True)

    async def _settle(
        self,
        ticket: Ticket,
        cost: int,
        record: dict[str, Any] | None,
        valid_until: int,
        cache: CacheWrite | None = None,
    ) -> None:
        slots = Slots.of(ticket.key_id)
        extra = dict(record or {})
        counted = [extra.pop(name, 0) for name in ("model", "input_tokens", "output_tokens")]
        fields: list[Any] = []
        for name, value in extra.items():
            fields += [name, value]
        keys = [slots.spend, slots.resv, slots.lease, slots.usage, slots.totals, slots.record]
        entry: list[Any] = ["", 0]
        if cache is not None:
            keys.append(cache.key)
            entry = [cache.entry, cache.ttl_seconds]
        args = [ticket.reservation_id, cost, 1 if record is not None else 0]
        args += [self.retention_ms, SETTLED_MARK_MS, *counted, *entry, valid_until, *fields]
        settled, _, charged = await self.store.run("settle_request", keys, args)
        if settled < 0:
            log.warning(
                "settlement of %s refused: it reached the store too late to be told from "
                "a repeat, and was not charged", ticket.reservation_id,
            )  # fmt: skip
        elif settled and record is not None and charged < cost:
            log.warning(
                "settlement of %s came after its lease ran out: charged %d of %d nano-USD "
                "so the key's cap holds", ticket.reservation_id, charged, cost,
            )  # fmt: skip

    async def _settle_later(
        self, ticket: Ticket, cost: int, record: dict[str, Any] | None, first: float
    ) -> None:
        """Each retry is cut after one store deadline, and a command sent is answered
        within `Store.in_flight_seconds` or its connection is dropped: no retry starts
        that would then land past the bound the script enforces (a command the network
        holds longer is refused there). One abandoned holds its reservation until the
        lease expires, charging nothing."""
        loop = asyncio.get_running_loop()
        valid_until = _valid_until(ticket, first)
        last_start = first + (SETTLED_MARK_MS - CLOCK_MARGIN_MS) / 1000 - self.retry_reach
        for pause in _SETTLE_RETRY_SECONDS:
            await asyncio.sleep(pause)
            if loop.time() > last_start:
                break
            try:
                async with asyncio.timeout(self.store.deadline):
                    await self._settle(ticket, cost, record, valid_until)
                return
            except (StoreUnavailable, TimeoutError):
                continue
        log.warning("settlement of %s abandoned; its lease will expire", ticket.reservation_id)

    @property
    def retry_reach(self) -> float:
        """How long after a retry starts its commands may still land."""
        return self.store.deadline + self.store.in_flight_seconds


def _valid_until(ticket: Ticket, first: float) -> int:
    """Redis time, µs, until which an attempt first sent at `first` (event-loop time)
    may charge a reservation the store no longer holds; 0 for no bound (a release,
    which never charges). From a lower bound of Redis time at `first`: admission's TIME
    was read before it answered, and loop time has passed since."""
    if ticket.clock_offset_us is None:
        return 0
    redis_us = ticket.clock_offset_us + int(first * 1_000_000)
    return redis_us + (SETTLED_MARK_MS - CLOCK_MARGIN_MS) * 1000


def _refusal(status: int, model: str, limit: int, reset_ms: int, detail: str) -> Exception:
    if status in (UNKNOWN, REVOKED):
        return Unauthorized("invalid or revoked API key")
    if status == NOT_ALLOWED:
        return ModelNotAllowed(f"this key may not use the model {model!r}")
    if status == RATE_LIMITED:
        return RateLimited(
            f"rate limit of {limit} requests per minute reached for this key",
            limit=limit,
            reset_ms=reset_ms,
        )
    cap = "monthly" if status == MONTHLY_CAP else "lifetime"
    return SpendCapReached(
        f"the key's {cap} spend cap of ${to_usd(int(detail)):.6f} would be exceeded by this "
        "request's worst-case cost"
    )
