"""The worst case of a request: its token bounds, its price, and what is reserved for it.

The input bound is the UTF-8 size of the whole JSON body that goes upstream (every field a
provider may bill as input is in it, and a token spans at least one byte), plus a
per-message and per-request allowance for the framing providers add, plus a per-image
allowance, since images are priced by their pixels, not by the bytes of their URL. The
output bound is the larger of `max_tokens` and `max_completion_tokens`, times `n`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.config import ModelConfig
from gateway.errors import BadRequest
from gateway.money import cost
from gateway.prices import Price

log = logging.getLogger(__name__)

MESSAGE_OVERHEAD = 16
# Providers wrap tools in instructions of their own (Anthropic: a few hundred tokens).
TOOLS_OVERHEAD = 1024
OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens")


@dataclass(slots=True)
class Plan:
    """A validated request, ready for admission."""

    body: dict[str, Any]  # what goes upstream (OpenAI shape, an output bound always set)
    model: str
    stream: bool
    include_usage: bool
    input_bound: int
    output_bound: int
    price: Price
    reservation: int  # nano-USD
    cache_key: str | None = None
    lookup: bool = False
    cache_write: bool = False
    deadline: float = 0.0  # event-loop time by which the request is cut
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, body: dict[str, Any], model: str, settings: ModelConfig, price: Price) -> Plan:
        output_bound = bound_output(body, settings.max_output_tokens) * (body.get("n") or 1)
        input_bound = bound_input(body, settings.image_token_bound)
        return cls(
            body=body,
            model=model,
            stream=bool(body.get("stream")),
            include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
            input_bound=input_bound,
            output_bound=output_bound,
            price=price,
            reservation=cost(input_bound, price.input_per_1k)
            + cost(output_bound, price.output_per_1k),
        )

    def charge(self, input_tokens: int, output_tokens: int) -> int:
        """The cost of what was used, never more than was reserved, so caps always hold."""
        actual = cost(input_tokens, self.price.input_per_1k)
        actual += cost(output_tokens, self.price.output_per_1k)
        if actual > self.reservation:
            log.warning(
                "usage reported for %s (%d in, %d out) is over its bounds; charged the reservation",
                self.model, input_tokens, output_tokens,
            )  # fmt: skip
            return self.reservation
        return actual


def bound_input(body: dict[str, Any], image_tokens: int) -> int:
    """An upper bound of input tokens for `body` as it goes upstream."""
    messages = body["messages"]
    size = len(orjson.dumps(body)) + MESSAGE_OVERHEAD * len(messages)
    if body.get("tools"):
        size += TOOLS_OVERHEAD
    return size + image_tokens * _image_count(messages)


def _image_count(messages: list[dict[str, Any]]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image_url"
    )


def bound_output(body: dict[str, Any], ceiling: int) -> int:
    """The output bound; when the client sets none, the model's ceiling is sent upstream."""
    asked = {name: body[name] for name in OUTPUT_FIELDS if body.get(name) is not None}
    for name, value in asked.items():
        if value > ceiling:
            raise BadRequest(f"{name}: {value} is over this model's limit of {ceiling}")
    if not asked:
        body["max_tokens"] = ceiling
        return ceiling
    return int(max(asked.values()))
