"""The built-in `mock` provider: a deterministic echo, for demos and load tests.

It answers "echo: <last user message>", counts a token per whitespace-separated word
(plus 3 per message for input), and honours `max_tokens` by truncating, so a fresh
install meters and caps exactly like a real provider with no account anywhere.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from gateway.providers.base import Chunk, Completion, StreamUsage


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _answer(body: dict[str, Any]) -> tuple[list[str], int, str]:
    messages = body["messages"]
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    words = ["echo:", *text_of(last_user["content"] if last_user else "").split()]
    input_tokens = sum(len(text_of(m.get("content")).split()) + 3 for m in messages)
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or len(words)
    finish = "length" if len(words) > limit else "stop"
    return words[:limit], input_tokens, finish


class MockProvider:
    def __init__(self, name: str) -> None:
        self.name = name

    async def complete(self, body: dict[str, Any], model: str) -> Completion:
        words, input_tokens, finish = _answer(body)
        message = {"role": "assistant", "content": " ".join(words)}
        answer = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": len(words),
                "total_tokens": input_tokens + len(words),
            },
        }
        return Completion(answer, input_tokens, len(words))

    async def stream(
        self, body: dict[str, Any], model: str, usage: StreamUsage
    ) -> AsyncIterator[Chunk]:
        words, input_tokens, finish = _answer(body)
        base: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}"}
        base["object"] = "chat.completion.chunk"
        base |= {"created": int(time.time()), "model": model}
        yield base | {"choices": [_choice({"role": "assistant", "content": ""})]}
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            usage.output_bytes += len(piece.encode())
            yield base | {"choices": [_choice({"content": piece})]}
        yield base | {"choices": [_choice({}, finish)]}
        usage.input_tokens, usage.output_tokens = input_tokens, len(words)
        total = input_tokens + len(words)
        yield base | {
            "choices": [],
            "usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": len(words),
                "total_tokens": total,
            },
        }

    async def aclose(self) -> None:
        return None


def _choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "finish_reason": finish}
