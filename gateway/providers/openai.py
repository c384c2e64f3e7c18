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
)


class OpenAIProvider(HTTPProvider):
    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    async def complete(self, body: dict[str, Any], model: str) -> Completion:
        answer = await self.post_json("/chat/completions", {**body, "model": model})
        try:
            usage = answer["usage"]
            if not isinstance(answer["choices"], list) or not answer["choices"]:
                raise TypeError("no choices")
            tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProviderFailure(self.name, "unparseable answer") from exc
        return Completion(answer, *tokens)

    async def stream(
        self, body: dict[str, Any], model: str, usage: StreamUsage
    ) -> AsyncIterator[Chunk]:
        upstream = {**body, "model": model, "stream_options": {"include_usage": True}}
        async with self.open_stream("/chat/completions", upstream) as events:
            async for event in events:
                if event.data.strip() == "[DONE]":
                    return
                chunk = decode_event(event.data, self.name)
                if "error" in chunk:
                    raise ProviderFailure(self.name, f"stream error: {chunk['error']}")
                count(chunk, usage)
                yield chunk
