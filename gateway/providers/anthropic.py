"""Anthropic's Messages API, translated to and from the OpenAI chat shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from gateway.errors import ProviderFailure
from gateway.providers.anthropic_request import to_messages_request
from gateway.providers.anthropic_translate import StreamTranslator, to_chat_completion
from gateway.providers.base import (
    Chunk,
    Completion,
    HTTPProvider,
    StreamUsage,
    count,
    decode_event,
)

API_VERSION = "2023-06-01"


class AnthropicProvider(HTTPProvider):
    def headers(self) -> dict[str, str]:
        return {
            "content-type": "application/json",
            "x-api-key": self.api_key,
            "anthropic-version": API_VERSION,
        }

    async def complete(self, body: dict[str, Any], model: str) -> Completion:
        request = to_messages_request(body, model, _max_tokens(body), stream=False)
        answer = await self.post_json("/v1/messages", request)
        try:
            completion = to_chat_completion(answer, model)
        except ValueError as exc:
            raise ProviderFailure(self.name, f"unparseable answer: {exc}") from exc
        usage = completion["usage"]
        return Completion(completion, usage["prompt_tokens"], usage["completion_tokens"])

    async def stream(
        self, body: dict[str, Any], model: str, usage: StreamUsage
    ) -> AsyncIterator[Chunk]:
        request = to_messages_request(body, model, _max_tokens(body), stream=True)
        translator = StreamTranslator(model)
        async with self.open_stream("/v1/messages", request) as events:
            async for event in events:
                try:
                    chunks = translator.feed(event.event, decode_event(event.data, self.name))
                except ValueError as exc:
                    raise ProviderFailure(self.name, f"stream error: {exc}") from exc
                usage.input_tokens = translator.input_tokens
                usage.output_tokens = translator.output_tokens
                for chunk in chunks:
                    count(chunk, usage, self.name)
                    yield chunk
                if translator.done:
                    yield translator.usage_chunk()
                    return
        raise ProviderFailure(self.name, "stream ended before message_stop")


def _max_tokens(body: dict[str, Any]) -> int:
    return int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
