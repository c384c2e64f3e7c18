"""Any OpenAI-compatible server: OpenAI, vLLM, Ollama, Groq, Together, OpenRouter..."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from gateway.errors import ProviderFailure
from gateway.providers.base import (
    Chunk,
    Completion,
    HTTPProvider,
    StreamUsage,
    count,
    decode_event,
    tokens,
)


class OpenAIProvider(HTTPProvider):
    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    async def complete(self, body: dict[str, Any], model: str) -> Completion:
        answer = await self.post_json("/chat/completions", {**body, "model": model})
        usage, choices = answer.get("usage"), answer.get("choices")
        if not isinstance(usage, dict) or not isinstance(choices, list) or not choices:
            raise ProviderFailure(self.name, "unparseable answer")
        if not all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
            raise ProviderFailure(self.name, "unparseable answer: choices")
        input_tokens = tokens(usage.get("prompt_tokens"), self.name)
        return Completion(answer, input_tokens, tokens(usage.get("completion_tokens"), self.name))

    async def stream(
        self, body: dict[str, Any], model: str, usage: StreamUsage
    ) -> AsyncIterator[Chunk]:
        upstream = {**body, "model": model, "stream_options": {"include_usage": True}}
        finished = False
        async with self.open_stream("/chat/completions", upstream) as events:
            async for event in events:
                if event.data.strip() == "[DONE]":
                    return
                chunk = decode_event(event.data, self.name)
                if "error" in chunk:
                    raise ProviderFailure(self.name, f"stream error: {chunk['error']}")
                count(chunk, usage, self.name)
                finished = finished or any(
                    c.get("finish_reason") for c in chunk.get("choices") or ()
                )
                yield chunk
        # A body that ends with no [DONE] and no finish_reason was cut: not a whole answer,
        # and never one to cache.
        if not finished:
            raise ProviderFailure(self.name, "stream ended before [DONE]")
