"""Streaming: a client that leaves cancels the upstream call and is settled at once."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from gateway.streams import Assembler, replay
from tests.servers import RedisServer, wait_until
from tests.test_routing import spend_state
from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


def test_client_disconnect_cancels_upstream_and_settles(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream], redis_server: RedisServer
) -> None:
    key, key_id = mint()
    upstreams["openai"].mode = "stall"
    upstreams["openai"].stall_seconds = 30
    started = time.monotonic()
    with httpx.stream(
        "POST",
        gateway_url + "/v1/chat/completions",
        json={
            "model": "gpt",
            "messages": [{"role": "user", "content": "leave early"}],
            "stream": True,
        },
        headers={"authorization": f"Bearer {key}"},
    ) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    # The upstream is stalled for 30 s; settlement must not wait for it.
    wait_until(lambda: spend_state(redis_server, key_id)[2] == 1, timeout=5)
    settled, reserved, records = spend_state(redis_server, key_id)
    assert (reserved, records) == (0, 1)
    assert settled > 0
    assert time.monotonic() - started < 10


def test_replay_assembles_back_to_the_same_completion() -> None:
    completion = {
        "id": "c1",
        "created": 1,
        "model": "m",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "hi",
                    "tool_calls": [
                        {
                            "id": "t1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": 1}'},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    assembler = Assembler()
    for chunk in replay(completion, include_usage=True):
        assembler.add(chunk)
    assert assembler.completion() == completion


def test_disconnect_before_first_chunk_cancels_and_releases(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream], redis_server: RedisServer
) -> None:
    key, key_id = mint()
    upstreams["openai"].delay_seconds = 4
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway_url + "/v1/chat/completions",
            json={
                "model": "fallback",
                "messages": [{"role": "user", "content": "gone"}],
                "stream": True,
            },
            headers={"authorization": f"Bearer {key}"},
            timeout=0.5,
        )
    # Released long before the upstream would have answered, and no fallback was tried.
    wait_until(lambda: spend_state(redis_server, key_id)[1] == 0, timeout=2)
    assert spend_state(redis_server, key_id) == (0, 0, 0)
    assert upstreams["claude"].requests == []
