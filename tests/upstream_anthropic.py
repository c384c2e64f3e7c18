"""The Anthropic Messages wire format for the stand-in upstreams of `upstreams`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.routing import Route

from tests.upstreams import Answer, Body, Prompt, Upstream, new_id, sse, word_pieces

_STOP_REASONS = {
    "end": "end_turn",
    "length": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool": "tool_use",
}
_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def text_of(content: Any) -> str:
    """Text of a string or of content blocks: text blocks and tool results, joined by a space."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for block in content:
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            texts.append(text_of(block.get("content")))
    return " ".join(texts)


class AnthropicDialect:
    path = "/v1/messages"
    prefix = ""
    garbage_event = b"event: content_block_start\ndata: {not json\n\n"

    def refuse(self, headers: Mapping[str, str], body: Body | None) -> tuple[int, Body] | None:
        # The API takes a key in x-api-key or, as newer SDKs send it, as a bearer token.
        if not headers.get("x-api-key") and not headers.get("authorization", "").startswith(
            "Bearer "
        ):
            return 401, self.error(401, "x-api-key header is required")
        if not headers.get("anthropic-version"):
            return 400, self.error(400, "anthropic-version: header is required")
        if body is None:
            return 400, self.error(400, "There was an issue with your request body.")
        for field in ("model", "messages", "max_tokens"):
            if field not in body:
                return 400, self.error(400, f"{field}: Field required")
        return None

    def error(self, status: int, message: str) -> Body:
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        error = {"type": _ERRORS.get(status, fallback), "message": message}
        return {"type": "error", "error": error}

    def prompt(self, body: Body) -> Prompt:
        messages = body["messages"]
        users = [m for m in messages if m.get("role") == "user"]
        system = text_of(body.get("system"))
        return Prompt(
            texts=[system, *(text_of(m.get("content")) for m in messages)],
            messages=len(messages),
            user_text=text_of(users[-1].get("content")) if users else "",
            max_tokens=body["max_tokens"],
            stops=list(body.get("stop_sequences") or []),
            tool=self._tool(body),
        )

    def _tool(self, body: Body) -> str | None:
        names = [tool["name"] for tool in body.get("tools") or [] if "name" in tool]
        choice = body.get("tool_choice") or {}
        if not names or choice.get("type") == "none":
            return None
        if choice.get("type") == "tool":
            return str(choice["name"])
        return str(names[0])

    def message(self, body: Body, answer: Answer) -> Body:
        return {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [self._block(answer, whole=True)],
            "stop_reason": _STOP_REASONS[answer.finish],
            "stop_sequence": answer.stop_sequence,
            "usage": _usage(answer.input_tokens, answer.output_tokens),
        }

    def events(self, body: Body, answer: Answer) -> list[bytes]:
        start = self.message(body, answer)
        start.update(content=[], stop_reason=None, stop_sequence=None)
        start["usage"] = _usage(answer.input_tokens, 1)
        block = self._block(answer, whole=False)
        stop = {"stop_reason": _STOP_REASONS[answer.finish], "stop_sequence": answer.stop_sequence}
        usage = {"output_tokens": answer.output_tokens}
        events: list[Body] = [
            {"type": "message_start", "message": start},
            {"type": "content_block_start", "index": 0, "content_block": block},
            {"type": "ping"},
            *_deltas(answer),
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": stop, "usage": usage},
            {"type": "message_stop"},
        ]
        return [sse(event, event=event["type"]) for event in events]

    def routes(self, upstream: Upstream) -> list[Route]:
        return []

    def _block(self, answer: Answer, whole: bool) -> Body:
        if answer.tool is None:
            return {"type": "text", "text": answer.content if whole else ""}
        arguments = json.loads(answer.content) if whole else {}
        return {"type": "tool_use", "id": new_id("toolu_"), "name": answer.tool, "input": arguments}


def _deltas(answer: Answer) -> list[Body]:
    kind, field = ("input_json_delta", "partial_json") if answer.tool else ("text_delta", "text")
    return [
        {"type": "content_block_delta", "index": 0, "delta": {"type": kind, field: piece}}
        for piece in word_pieces(answer.content)
    ]


def _usage(input_tokens: int, output_tokens: int) -> Body:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
