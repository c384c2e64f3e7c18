"""An OpenAI chat completions request as an Anthropic Messages API body.

Pure functions, no I/O. A request the translation cannot express is the client's fault:
`BadRequest`, naming the field. The way back (responses and event streams) is in
`anthropic_translate`.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import BadRequest

Json = dict[str, Any]

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
