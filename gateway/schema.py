"""Request validation: the OpenAI chat schema and the native request, checked before money.

Bodies are decoded with orjson, which refuses NaN, Infinity, invalid UTF-8 and integers
beyond 64 bits, checked for nesting depth, then validated by pydantic in strict mode (no
"1" for 1). The first problem becomes a 400 whose message names the field, as
`messages[0].role: ...`.
Fields the schema does not know are forwarded as they are.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import BadRequest

# orjson reads 1024 levels but writes only 254; nothing legitimate nests past this.
MAX_DEPTH = 64

Float = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(max_length=256)]


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioPart(_Part):
    type: Literal["input_audio"]
    input_audio: dict[str, str]


class FilePart(_Part):
    type: Literal["file"]
    file: dict[str, str]


class RefusalPart(_Part):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


class FunctionCall(_Part):
    name: Name
    arguments: str


class ToolCall(_Part):
    id: str
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(_Part):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: Name | None = None


class UserMessage(_Part):
    role: Literal["user"]
    content: str | list[UserPart]
    name: Name | None = None


class AssistantMessage(_Part):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None
    name: Name | None = None


class ToolMessage(_Part):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


class FunctionDef(_Part):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Part):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Part):
    name: Name


class ToolChoice(_Part):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Part):
    include_usage: bool | None = None


class ResponseFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]


class PromptRef(_Part):
    """The gateway's own field: render a stored template into the first message."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: Name
    version: Annotated[int, Field(ge=1)] | None = None
    variables: dict[str, Any] = Field(default_factory=dict)
    role: Literal["system", "developer", "user", "assistant"] = "system"


class ChatRequest(_Part):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[Message], Field(min_length=1, max_length=10_000)]
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[Float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    seed: int | None = None
    user: Annotated[str, Field(max_length=512)] | None = None
    tools: Annotated[list[Tool], Field(max_length=512)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    prompt: PromptRef | None = None


class NativeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[Message], Field(min_length=1, max_length=10_000)]
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    prompt: PromptRef | None = None


def decode(raw: bytes) -> dict[str, Any]:
    """A JSON object from a request body, or a 400 saying why not."""
    if not raw:
        raise BadRequest("the request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if _deeper_than(body, MAX_DEPTH):
        raise BadRequest(f"the request body is nested more than {MAX_DEPTH} levels deep")
    return body


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON containers nest beyond `limit`; iterative, so any depth is safe."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def check(model: type[BaseModel], body: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(describe(exc)) from exc
    except RecursionError as exc:
        raise BadRequest("the request body is nested too deeply") from exc


def describe(exc: ValidationError) -> str:
    """The most specific problem, at its field path; union alternatives joined with "or"."""
    found: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        found.setdefault(_path(err["loc"]), []).append(err["msg"])
    where = max(found, key=lambda path: path.count(".") + path.count("["))
    return f"{where}: {' or '.join(dict.fromkeys(found[where]))}"


_TAGS = {"system", "developer", "user", "assistant", "tool", "text", "image_url", "input_audio",
         "file", "refusal"}  # fmt: skip


def _path(loc: tuple[int | str, ...]) -> str:
    """`messages[0].content` from pydantic's loc, without its union-member markers."""
    path, after_index = "", False
    for part in loc:
        if isinstance(part, int):
            path, after_index = f"{path}[{part}]", True
            continue
        marker = "[" in part or part[:1].isupper() or part in {"str", "int", "float", "bool"}
        if not marker and not (after_index and part in _TAGS):
            path = f"{path}.{part}"
        after_index = False
    return path.lstrip(".") or "body"
