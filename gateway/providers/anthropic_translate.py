"""Anthropic Messages API answers in the OpenAI Chat Completions shape.

Pure functions, no I/O: a Messages response or event stream becomes `chat.completion`
objects or chunks. An answer of the wrong shape is the upstream's fault (`ValueError`,
which the caller turns into a fallback). The way there (requests) is in
`anthropic_request`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from gateway.providers.base import MAX_TOKENS

_T = TypeVar("_T")
Json = dict[str, Any]

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def to_chat_completion(message: object, model: str) -> Json:
    message = _require(message, dict, "message")
    blocks = _require(message.get("content"), list, "content")
    usage = _require(message.get("usage"), dict, "usage")
    for key in ("input_tokens", "output_tokens"):
        _require(usage.get(key), int, f"usage.{key}")
    text, tool_calls = _collect(blocks)

    reply: Json = {"role": "assistant", "content": text}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    choice = {"index": 0, "message": reply, "finish_reason": _finish(message.get("stop_reason"))}
    return {
        "id": _require(message.get("id"), str, "id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(_input_tokens(usage), _count(usage, "output_tokens")),
    }


def _collect(blocks: list[Any]) -> tuple[str | None, list[Json]]:
    texts: list[str] = []
    calls: list[Json] = []
    for k, raw in enumerate(blocks):
        block = _require(raw, dict, f"content[{k}]")
        kind = block.get("type")
        if kind == "text":
            texts.append(_require(block.get("text"), str, f"content[{k}].text"))
        elif kind == "tool_use":
            calls.append(_tool_call(block, f"content[{k}]"))
    return ("".join(texts) if texts else None), calls


def _tool_call(block: Json, where: str) -> Json:
    arguments = orjson.dumps(_require(block.get("input"), dict, f"{where}.input")).decode()
    name = _require(block.get("name"), str, f"{where}.name")
    call_id = _require(block.get("id"), str, f"{where}.id")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _finish(stop_reason: object) -> str:
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> Json:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _input_tokens(usage: Json) -> int:
    # Anthropic counts cached input apart from input_tokens; OpenAI's prompt_tokens include it.
    keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return sum(_count(usage, key) for key in keys)


def _count(usage: Json, key: str) -> int:
    value = usage.get(key)
    if value is None:
        return 0
    if not 0 <= _require(value, int, f"usage.{key}") <= MAX_TOKENS:
        raise ValueError(f"usage.{key}: {value} is not a token count")
    return int(value)


def _require(value: object, kind: type[_T], where: str) -> _T:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
    return value


class StreamTranslator:
    """Anthropic stream events in, OpenAI `chat.completion.chunk` dicts out, with usage kept."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.created = int(time.time())
        self.id = ""
        self.input_tokens = 0
        self.output_tokens = 0
        self.finish_reason: str | None = None
        self.done = False
        self._tool_index: dict[int, int] = {}
        self._handlers: dict[str, Callable[[Json], list[Json]]] = {
            "message_start": self._message_start,
            "content_block_start": self._block_start,
            "content_block_delta": self._block_delta,
            "message_delta": self._message_delta,
            "message_stop": self._message_stop,
        }

    def feed(self, event: str, data: object) -> list[Json]:
        data = _require(data, dict, f"{event} data")
        if event == "error":
            raise ValueError(_error_message(data))
        handler = self._handlers.get(event)
        # ping, content_block_stop and event types added later carry nothing to forward.
        if handler is None:
            return []
        if event != "message_start" and not self.id:
            raise ValueError(f"{event}: received before message_start")
        return handler(data)

    def usage_chunk(self) -> Json:
        usage = _usage(self.input_tokens, self.output_tokens)
        return {**self._header(), "choices": [], "usage": usage}

    def _header(self) -> Json:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }

    def _chunk(self, delta: Json, finish_reason: str | None = None) -> Json:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {**self._header(), "choices": [choice]}

    def _message_start(self, data: Json) -> list[Json]:
        message = _require(data.get("message"), dict, "message_start.message")
        self.id = _require(message.get("id"), str, "message_start.message.id")
        usage = _require(message.get("usage"), dict, "message_start.message.usage")
        self.input_tokens = _input_tokens(usage)
        self.output_tokens = _count(usage, "output_tokens")
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, data: Json) -> list[Json]:
        index = _require(data.get("index"), int, "content_block_start.index")
        block = _require(data.get("content_block"), dict, "content_block_start.content_block")
        kind = block.get("type")
        if kind == "text":
            text = _require(block.get("text", ""), str, "content_block_start.content_block.text")
            return [self._chunk({"content": text})] if text else []
        if kind != "tool_use":
            return []

        position = self._tool_index[index] = len(self._tool_index)
        function = {"name": _require(block.get("name"), str, "tool_use.name"), "arguments": ""}
        call_id = _require(block.get("id"), str, "tool_use.id")
        call = {"index": position, "id": call_id, "type": "function", "function": function}
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, data: Json) -> list[Json]:
        index = _require(data.get("index"), int, "content_block_delta.index")
        delta = _require(data.get("delta"), dict, "content_block_delta.delta")
        kind = delta.get("type")
        if kind == "text_delta":
            text = _require(delta.get("text"), str, "text_delta.text")
            return [self._chunk({"content": text})] if text else []
        if kind != "input_json_delta":
            return []

        partial = _require(delta.get("partial_json"), str, "input_json_delta.partial_json")
        if index not in self._tool_index:
            raise ValueError(f"input_json_delta: block {index} is not a tool_use")
        if not partial:
            return []
        call = {"index": self._tool_index[index], "function": {"arguments": partial}}
        return [self._chunk({"tool_calls": [call]})]

    def _message_delta(self, data: Json) -> list[Json]:
        delta = _require(data.get("delta"), dict, "message_delta.delta")
        usage = data.get("usage")
        if usage is not None:
            self._update_usage(_require(usage, dict, "message_delta.usage"))
        stop_reason = delta.get("stop_reason")
        if stop_reason is None:
            return []
        self.finish_reason = _finish(stop_reason)
        return [self._chunk({}, self.finish_reason)]

    def _update_usage(self, usage: Json) -> None:
        # Counts here are cumulative, and input counts may be absent or partial: keep the max.
        self.input_tokens = max(self.input_tokens, _input_tokens(usage))
        if usage.get("output_tokens") is not None:
            self.output_tokens = _count(usage, "output_tokens")

    def _message_stop(self, data: Json) -> list[Json]:
        self.done = True
        return []


def _error_message(data: Json) -> str:
    error = data.get("error")
    if not isinstance(error, dict):
        return "upstream stream error"
    kind, message = error.get("type"), error.get("message")
    return f"{kind}: {message}" if kind else str(message)
