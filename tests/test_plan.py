"""The worst case of a request: token bounds, reservation, and the charge ceiling."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ModelConfig
from gateway.errors import BadRequest
from gateway.plan import Plan, bound_input, bound_output
from gateway.prices import Price

MODEL = ModelConfig.model_validate(
    {"input_per_1k": 1, "output_per_1k": 2, "max_output_tokens": 100,
     "routes": [{"provider": "p", "model": "m"}]}
)  # fmt: skip
PRICE = Price.of(1, 2)  # $1 / $2 per 1K tokens


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_bound_input_counts_every_forwarded_field() -> None:
    plain = bound_input(body(), 0)
    with_schema = bound_input(body(functions=[{"name": "f", "parameters": {"x": "y" * 5000}}]), 0)
    assert with_schema - plain >= 5000


def test_bound_input_counts_utf8_bytes_and_images() -> None:
    assert bound_input(body(messages=[{"role": "user", "content": "é" * 100}]), 0) >= 200
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    with_image = body(messages=[{"role": "user", "content": [image]}])
    assert bound_input(with_image, 3000) - bound_input(with_image, 0) == 3000


@pytest.mark.parametrize(
    ("fields", "bound"),
    [
        pytest.param({}, 100, id="none-sends-the-ceiling"),
        pytest.param({"max_tokens": 7}, 7, id="max-tokens"),
        pytest.param({"max_completion_tokens": 9}, 9, id="max-completion-tokens"),
        pytest.param({"max_tokens": 50, "max_completion_tokens": 1}, 50, id="both-take-the-larger"),
    ],
)
def test_bound_output(fields: dict[str, Any], bound: int) -> None:
    request = body(**fields)
    assert bound_output(request, 100) == bound
    assert max(request.get("max_tokens") or 0, request.get("max_completion_tokens") or 0) == bound


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_bound_output_over_the_ceiling_is_400(name: str) -> None:
    with pytest.raises(BadRequest, match=name):
        bound_output(body(**{name: 101}), 100)


def test_reservation_covers_n_choices() -> None:
    single = Plan.of(body(max_tokens=10), "m", MODEL, PRICE)
    triple = Plan.of(body(max_tokens=10, n=3), "m", MODEL, PRICE)
    assert triple.output_bound == 3 * single.output_bound == 30
    assert triple.reservation - single.reservation >= 20 * 2 * 10**6  # 20 tokens at $2/1K


def test_charge_never_exceeds_the_reservation() -> None:
    plan = Plan.of(body(max_tokens=10), "m", MODEL, PRICE)
    assert plan.charge(1, 1) == 3 * 10**6  # $0.001 + $0.002
    assert plan.charge(10**6, 10**6) == plan.reservation
