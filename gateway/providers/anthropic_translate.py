"""Translation between OpenAI Chat Completions and the Anthropic Messages API.

Pure functions, no I/O: a chat completions request becomes a `/v1/messages` body, and a
Messages response or event stream becomes `chat.completion` objects or chunks. A request
the translation cannot express is the client's fault (`BadRequest`, naming the field); a
response of the wrong shape is the upstream's (`ValueError`, which the caller turns into
a fallback).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from gateway.errors import BadRequest

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
TOOL_CHOICES = {"auto": "auto", "required": "any", "none": "none"}
MAX_TEMPERATURE = 1.0


def to_messages_request(body: Json, model: str, max_tokens: int, stream: bool) -> Json:
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("n: Anthropic models return a single choice; n must be 1")

    system, turns = _split_messages(body.get("messages"))
    request: Json = {"model": model, "max_tokens": max_tokens, "messages": turns}
    if system:
        request["system"] = system
    request.update(_sampling(body))
    request.update(_tooling(body))
    if stream:
        request["stream"] = True
    return request


def _split_messages(messages: object) -> tuple[str, list[Json]]:
    if not isinstance(messages, list):
        raise BadRequest("messages: expected a list")
    system: list[str] = []
    turns: list[Json] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}]: expected an object")
        if message.get("role") in ("system", "developer"):
            system.extend(_text_parts(message.get("content"), f"messages[{i}].content"))
            continue
        role, blocks = _turn(message, i)
        _append_turn(turns, role, blocks)
    return "\n\n".join(text for text in system if text), turns


def _turn(message: Json, i: int) -> tuple[str, list[Json]]:
    role = message.get("role")
    if role == "user":
        return "user", _content_blocks(message.get("content"), f"messages[{i}].content")
    if role == "assistant":
        return "assistant", _assistant_blocks(message, i)
    if role == "tool":
        return "user", [_tool_result(message, i)]
    raise BadRequest(f"messages[{i}].role: {role!r} is not supported")


def _append_turn(turns: list[Json], role: str, blocks: list[Json]) -> None:
    # Anthropic refuses empty content and requires user/assistant to alternate.
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _text_parts(content: object, where: str) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise BadRequest(f"{where}: expected a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
        if not isinstance(text, str):
            raise BadRequest(f"{where}[{j}]: only text parts are allowed here")
        texts.append(text)
    return texts


def _content_blocks(content: object, where: str) -> list[Json]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise BadRequest(f"{where}: expected a string or a list of parts")
    blocks = [_part_block(part, f"{where}[{j}]") for j, part in enumerate(content)]
    return [block for block in blocks if block is not None]


def _part_block(part: object, where: str) -> Json | None:
    if not isinstance(part, dict):
        raise BadRequest(f"{where}: expected an object")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"{where}.text: expected a string")
        return {"type": "text", "text": text} if text else None
    if kind == "image_url":
        return _image_block(part.get("image_url"), f"{where}.image_url.url")
    raise BadRequest(f"{where}.type: {kind!r} parts are not supported for this model")


def _image_block(image_url: object, where: str) -> Json:
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise BadRequest(f"{where}: expected a string")
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}

    header, comma, data = url.partition(",")
    if not (comma and header.startswith("data:") and header.endswith(";base64")):
        raise BadRequest(f"{where}: expected an http(s) URL or a base64 data URL")
    media_type = header.removeprefix("data:").split(";")[0]
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _assistant_blocks(message: Json, i: int) -> list[Json]:
    blocks = _content_blocks(message.get("content"), f"messages[{i}].content")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BadRequest(f"messages[{i}].tool_calls: expected a list")
    for j, call in enumerate(calls):
        blocks.append(_tool_use_block(call, f"messages[{i}].tool_calls[{j}]"))
    return blocks


def _tool_use_block(call: object, where: str) -> Json:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or not isinstance(function, dict):
        raise BadRequest(f"{where}.function: expected an object")
    call_id, name = call.get("id"), function.get("name")
    if not isinstance(call_id, str):
        raise BadRequest(f"{where}.id: expected a string")
    if not isinstance(name, str):
        raise BadRequest(f"{where}.function.name: expected a string")
    arguments = _arguments(function.get("arguments"), f"{where}.function.arguments")
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def _arguments(raw: object, where: str) -> Json:
    # Some clients send "" for a call without arguments; it means the same as "{}".
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise BadRequest(f"{where}: expected a JSON string")
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{where}: not valid JSON") from exc
    if not isinstance(parsed, dict):
        raise BadRequest(f"{where}: expected a JSON object")
    return parsed


def _tool_result(message: Json, i: int) -> Json:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise BadRequest(f"messages[{i}].tool_call_id: expected a string")
    text = "\n\n".join(_text_parts(message.get("content"), f"messages[{i}].content"))
    result: Json = {"type": "tool_result", "tool_use_id": call_id}
    if text:
        result["content"] = text
    return result


def _sampling(body: Json) -> Json:
    out: Json = {}
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = list(stop)
    temperature = body.get("temperature")
    if isinstance(temperature, int | float):
        out["temperature"] = min(max(float(temperature), 0.0), MAX_TEMPERATURE)
    # Recent Anthropic models refuse temperature and top_p together; top_p=1 is a no-op.
    top_p = body.get("top_p")
    if top_p is not None and top_p != 1:
        out["top_p"] = top_p
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    return out


def _tooling(body: Json) -> Json:
    tools = body.get("tools")
    if not tools:
        return {}
    if not isinstance(tools, list):
        raise BadRequest("tools: expected a list")
    out: Json = {"tools": [_tool(tool, f"tools[{k}]") for k, tool in enumerate(tools)]}
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and choice.get("type") != "none":
        choice = {"type": "auto", **choice, "disable_parallel_tool_use": True}
    if choice:
        out["tool_choice"] = choice
    return out


def _tool(tool: object, where: str) -> Json:
    is_function = isinstance(tool, dict) and tool.get("type") == "function"
    function = tool.get("function") if isinstance(tool, dict) and is_function else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"{where}: only function tools with a name are supported")
    out: Json = {"name": function["name"]}
    if function.get("description"):
        out["description"] = function["description"]
    out["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return out


def _tool_choice(raw: object) -> Json:
    if raw is None:
        return {}
    if isinstance(raw, str) and raw in TOOL_CHOICES:
        return {"type": TOOL_CHOICES[raw]}
    function = raw.get("function") if isinstance(raw, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(name, str):
        raise BadRequest("tool_choice: expected auto, required, none or a function by name")
    return {"type": "tool", "name": name}


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
    return 0 if value is None else _require(value, int, f"usage.{key}")


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
