"""The stand-in upstreams speak the wire formats: driven here with the official SDKs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from tests.upstreams import Recorded, Upstream, anthropic_upstream, openai_upstream, word_pieces

pytestmark = pytest.mark.e2e

MODEL = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-5"
HELLO: list[Any] = [{"role": "user", "content": "hello there world"}]
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
]
CLAUDE_TOOLS: list[Any] = [
    {"name": "search", "input_schema": {"type": "object"}},
    {"name": "lookup", "input_schema": {"type": "object"}},
]
KINDS = [
    pytest.param(kind, stream, id=f"{kind}-{'stream' if stream else 'whole'}")
    for kind in ("openai", "anthropic")
    for stream in (False, True)
]
CUT_ERRORS = (openai.APIConnectionError, anthropic.APIConnectionError, httpx2.RemoteProtocolError)
TIMEOUTS = (openai.APITimeoutError, anthropic.APITimeoutError, httpx2.ReadTimeout)
STATUS_ERRORS = [
    pytest.param(400, openai.BadRequestError, anthropic.BadRequestError, id="400"),
    pytest.param(401, openai.AuthenticationError, anthropic.AuthenticationError, id="401"),
    pytest.param(429, openai.RateLimitError, anthropic.RateLimitError, id="429"),
    pytest.param(500, openai.InternalServerError, anthropic.InternalServerError, id="500"),
]


@pytest.fixture(scope="module")
def oai_up() -> Iterator[Upstream]:
    with openai_upstream() as up:
        yield up


@pytest.fixture(scope="module")
def ant_up() -> Iterator[Upstream]:
    with anthropic_upstream() as up:
        yield up


@pytest.fixture(autouse=True)
def _fresh(oai_up: Upstream, ant_up: Upstream) -> None:
    for up in (oai_up, ant_up):
        up.reset()
        up.stall_seconds = 2.0


# Clients are shared: building one costs tens of milliseconds.
@pytest.fixture(scope="module")
def oai(oai_up: Upstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=oai_up.base_url, api_key="sk-test", max_retries=0, timeout=3)


@pytest.fixture(scope="module")
def ant(ant_up: Upstream) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=ant_up.base_url, api_key="sk-ant-test", max_retries=0, timeout=3
    )


def claude(client: anthropic.Anthropic, **params: Any) -> Any:
    params = {"model": CLAUDE, "max_tokens": 100, "messages": HELLO, **params}
    return client.messages.create(**params)


@pytest.fixture
def ups(oai_up: Upstream, ant_up: Upstream) -> dict[str, Upstream]:
    return {"openai": oai_up, "anthropic": ant_up}


@pytest.fixture
def clients(oai: openai.OpenAI, ant: anthropic.Anthropic) -> dict[str, Any]:
    return {"openai": oai, "anthropic": ant}


def call(client: Any, stream: bool, timeout: float = 3, into: list[Any] | None = None) -> None:
    """One chat request through an official SDK client; a stream is read into `into`."""
    client = client.with_options(timeout=timeout)
    if isinstance(client, openai.OpenAI):
        result: Any = client.chat.completions.create(model=MODEL, messages=HELLO, stream=stream)
    else:
        result = claude(client, stream=stream)
    if stream:
        received = into if into is not None else []
        received.extend(result)


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        pytest.param("echo: a  b", ["echo:", " a", "  b"], id="spaces-kept"),
        pytest.param(" a b ", [" a", " b "], id="edges"),
        pytest.param("", [], id="empty"),
    ],
)
def test_word_pieces_join_back(text: str, pieces: list[str]) -> None:
    assert word_pieces(text) == pieces
    assert "".join(pieces) == text


def test_upstream_mode_rejects_unknown(oai_up: Upstream) -> None:
    with pytest.raises(ValueError, match="unknown upstream mode"):
        oai_up.mode = "explode"


def spoil(up: Upstream) -> None:
    up.mode, up.reply, up.delay_seconds = "status:500", "x", 1.0
    up.requests.append(Recorded("/", {}, {}))


def test_upstream_reset_restores_defaults(oai_up: Upstream) -> None:
    spoil(oai_up)
    oai_up.reset()
    assert (oai_up.requests, oai_up.mode, oai_up.reply, oai_up.delay_seconds) == ([], "ok", None, 0)


def test_upstream_stop_does_not_wait_out_a_stall() -> None:
    up = openai_upstream()
    up.mode, up.stall_seconds = "stall", 30.0
    client = openai.OpenAI(base_url=up.base_url, api_key="sk-test", max_retries=0)
    stalled = threading.Thread(
        target=lambda: client.chat.completions.create(model=MODEL, messages=HELLO), daemon=True
    )
    stalled.start()
    deadline = time.monotonic() + 2
    while not up.requests and time.monotonic() < deadline:
        time.sleep(0.01)

    started = time.monotonic()
    up.stop()
    assert time.monotonic() - started < 2
    stalled.join(timeout=2)


def test_openai_create_echoes_and_counts(oai_up: Upstream, oai: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, *HELLO]
    completion = oai.chat.completions.create(model=MODEL, messages=messages)

    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert completion.choices[0].message.content == "echo: hello there world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 4)
    assert completion.usage.total_tokens == 15
    [seen] = oai_up.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.body["messages"] == messages


def test_openai_create_joins_text_parts(oai: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "parts"}]
    messages: list[Any] = [{"role": "user", "content": parts}]
    completion = oai.chat.completions.create(model=MODEL, messages=messages)
    assert completion.choices[0].message.content == "echo: hello parts"


def test_openai_create_answers_reply(oai_up: Upstream, oai: openai.OpenAI) -> None:
    oai_up.reply = "fixed answer"
    completion = oai.chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.choices[0].message.content == "fixed answer"


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_openai_create_truncates_at_max_tokens(oai: openai.OpenAI, limit: str) -> None:
    params: dict[str, Any] = {"model": MODEL, "messages": HELLO, limit: 2}
    completion = oai.chat.completions.create(**params)
    assert completion.choices[0].message.content == "echo: hello"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2


def test_openai_create_stops_before_stop_sequence(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model=MODEL, messages=HELLO, stop=["world", "there"])
    assert completion.choices[0].message.content == "echo: hello "
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("choice", "name"),
    [
        pytest.param(None, "search", id="first"),
        pytest.param({"type": "function", "function": {"name": "lookup"}}, "lookup", id="forced"),
    ],
)
def test_openai_create_calls_tool(oai: openai.OpenAI, choice: Any, name: str) -> None:
    extra = {} if choice is None else {"tool_choice": choice}
    completion = oai.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS, **extra)

    message = completion.choices[0].message
    assert message.content is None and message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == name
    assert json.loads(call.function.arguments) == {"query": "hello there world"}
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is not None and completion.usage.completion_tokens == 4


def test_openai_create_tool_choice_none_answers_text(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        tools=TOOLS,
        tool_choice="none",
    )
    assert completion.choices[0].message.content == "echo: hello there world"


def test_openai_stream_sends_one_chunk_per_word(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model=MODEL, messages=HELLO, stream=True))

    assert chunks[0].choices[0].delta.role == "assistant"
    words = [chunk.choices[0].delta.content for chunk in chunks[1:-1]]
    assert words == ["echo:", " hello", " there", " world"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_openai_stream_include_usage_wire(oai_up: Upstream) -> None:
    body = {
        "model": MODEL,
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"authorization": "Bearer sk-test"}
    answer = httpx.post(f"{oai_up.base_url}/chat/completions", json=body, headers=headers)

    assert answer.headers["content-type"].startswith("text/event-stream")
    frames = answer.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-2]]
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}


def test_openai_stream_helper_assembles_tool_call(oai: openai.OpenAI) -> None:
    with oai.chat.completions.stream(model=MODEL, messages=HELLO, tools=TOOLS) as stream:
        completion = stream.get_final_completion()

    calls = completion.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "search"
    assert json.loads(calls[0].function.arguments) == {"query": "hello there world"}
    assert completion.choices[0].finish_reason == "tool_calls"


def test_openai_models_lists(oai: openai.OpenAI) -> None:
    assert "gpt-4o-mini" in [model.id for model in oai.models.list()]


def test_openai_refuses_missing_key(oai_up: Upstream) -> None:
    answer = httpx.post(f"{oai_up.base_url}/chat/completions", json={"model": MODEL})
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("status", "error", "_"), STATUS_ERRORS)
def test_openai_status_mode_raises(
    oai_up: Upstream, oai: openai.OpenAI, status: int, error: type[openai.APIStatusError], _: Any
) -> None:
    oai_up.mode = f"status:{status}"
    with pytest.raises(error) as raised:
        oai.chat.completions.create(model=MODEL, messages=HELLO)
    assert raised.value.status_code == status
    assert set(raised.value.response.json()["error"]) >= {"message", "type", "code"}
    assert len(oai_up.requests) == 1


def test_anthropic_create_echoes_and_counts(ant_up: Upstream, ant: anthropic.Anthropic) -> None:
    message = claude(ant, system="be brief")

    assert message.id.startswith("msg_") and message.model == CLAUDE
    assert message.content[0].text == "echo: hello there world"
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (8, 4)
    [seen] = ant_up.requests
    assert seen.path == "/v1/messages"
    assert "anthropic-version" in seen.headers
    assert seen.body["system"] == "be brief"


def test_anthropic_create_truncates_at_max_tokens(ant: anthropic.Anthropic) -> None:
    message = claude(ant, max_tokens=3)
    assert message.content[0].text == "echo: hello there"
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 3)


def test_anthropic_create_stops_before_stop_sequence(ant: anthropic.Anthropic) -> None:
    message = claude(ant, stop_sequences=["world", "there"])
    assert message.content[0].text == "echo: hello "
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "there")


@pytest.mark.parametrize(
    ("choice", "name"),
    [
        pytest.param(None, "search", id="first"),
        pytest.param({"type": "any"}, "search", id="any"),
        pytest.param({"type": "tool", "name": "lookup"}, "lookup", id="forced"),
    ],
)
def test_anthropic_create_uses_tool(ant: anthropic.Anthropic, choice: Any, name: str) -> None:
    extra = {} if choice is None else {"tool_choice": choice}
    message = claude(ant, tools=CLAUDE_TOOLS, **extra)

    [block] = message.content
    assert (block.type, block.name, block.input) == (
        "tool_use",
        name,
        {"query": "hello there world"},
    )
    assert block.id.startswith("toolu_")
    assert (message.stop_reason, message.usage.output_tokens) == ("tool_use", 4)


def test_anthropic_create_tool_choice_none_answers_text(ant: anthropic.Anthropic) -> None:
    message = claude(ant, tools=CLAUDE_TOOLS, tool_choice={"type": "none"})
    assert message.content[0].text == "echo: hello there world"


def test_anthropic_stream_event_sequence(ant: anthropic.Anthropic) -> None:
    events = list(claude(ant, stream=True))

    kinds = [event.type for event in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start, delta = events[0].message, events[-2]
    assert (start.content, start.usage.input_tokens, start.usage.output_tokens) == ([], 6, 1)
    assert "".join(e.delta.text for e in events[2:6]) == "echo: hello there world"
    assert (delta.delta.stop_reason, delta.usage.output_tokens) == ("end_turn", 4)


def test_anthropic_stream_wire_has_names_and_ping(ant_up: Upstream) -> None:
    body = {"model": CLAUDE, "max_tokens": 5, "messages": HELLO, "stream": True}
    headers = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
    answer = httpx.post(f"{ant_up.base_url}/v1/messages", json=body, headers=headers)

    frames = [frame.split("\n") for frame in answer.text.split("\n\n") if frame]
    names = [lines[0].removeprefix("event: ") for lines in frames]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(
        json.loads(lines[1].removeprefix("data: "))["type"] == n
        for n, lines in zip(names, frames, strict=True)
    )


@pytest.mark.parametrize(
    "tools", [pytest.param([], id="text"), pytest.param(CLAUDE_TOOLS, id="tool_use")]
)
def test_anthropic_stream_helper_matches_create(ant: anthropic.Anthropic, tools: list[Any]) -> None:
    params: dict[str, Any] = {"model": CLAUDE, "max_tokens": 100, "messages": HELLO, "tools": tools}
    with ant.messages.stream(**params) as stream:
        streamed = stream.get_final_message()
    created = ant.messages.create(**params)

    def shape(message: Any) -> Any:
        content = [block.model_dump(exclude={"id"}) for block in message.content]
        return content, message.stop_reason, message.usage.model_dump()

    assert shape(streamed) == shape(created)


@pytest.mark.parametrize(
    ("headers", "body", "status", "kind"),
    [
        pytest.param(
            {"anthropic-version": "2023-06-01"}, {}, 401, "authentication_error", id="no-key"
        ),
        pytest.param({"x-api-key": "k"}, {}, 400, "invalid_request_error", id="no-version"),
        pytest.param(
            {"x-api-key": "k", "anthropic-version": "2023-06-01"},
            {"model": CLAUDE, "messages": HELLO},
            400,
            "invalid_request_error",
            id="no-max-tokens",
        ),
    ],
)
def test_anthropic_refuses_incomplete_request(
    ant_up: Upstream, headers: dict[str, str], body: dict[str, Any], status: int, kind: str
) -> None:
    answer = httpx.post(f"{ant_up.base_url}/v1/messages", json=body, headers=headers)
    assert answer.status_code == status
    assert (answer.json()["type"], answer.json()["error"]["type"]) == ("error", kind)
    assert len(ant_up.requests) == 1


@pytest.mark.parametrize(("status", "_", "error"), STATUS_ERRORS)
def test_anthropic_status_mode_raises(
    ant_up: Upstream,
    ant: anthropic.Anthropic,
    status: int,
    _: Any,
    error: type[anthropic.APIStatusError],
) -> None:
    ant_up.mode = f"status:{status}"
    with pytest.raises(error) as raised:
        claude(ant)
    assert raised.value.status_code == status
    assert raised.value.response.json()["type"] == "error"
    assert len(ant_up.requests) == 1


def test_anthropic_status_529_is_overloaded(ant_up: Upstream, ant: anthropic.Anthropic) -> None:
    ant_up.mode = "status:529"
    with pytest.raises(anthropic.OverloadedError):
        claude(ant)


@pytest.mark.parametrize(("kind", "stream"), KINDS)
def test_upstream_malformed_fails_to_parse(
    ups: dict[str, Upstream], clients: dict[str, Any], kind: str, stream: bool
) -> None:
    ups[kind].mode = "malformed"
    with pytest.raises(json.JSONDecodeError):
        call(clients[kind], stream)
    assert len(ups[kind].requests) == 1


@pytest.mark.parametrize(("kind", "stream"), KINDS)
def test_upstream_cut_breaks_the_connection(
    ups: dict[str, Upstream], clients: dict[str, Any], kind: str, stream: bool
) -> None:
    ups[kind].mode = "cut"
    received: list[Any] = []
    with pytest.raises(CUT_ERRORS):
        call(clients[kind], stream, into=received)
    assert 1 <= len(received) < 5 if stream else received == []


@pytest.mark.parametrize(("kind", "stream"), KINDS)
def test_upstream_stall_times_the_client_out(
    ups: dict[str, Upstream], clients: dict[str, Any], kind: str, stream: bool
) -> None:
    ups[kind].mode = "stall"
    started = time.monotonic()
    with pytest.raises(TIMEOUTS):
        call(clients[kind], stream, timeout=0.3)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_upstream_slow_delays_the_answer(
    ups: dict[str, Upstream], clients: dict[str, Any], kind: str
) -> None:
    ups[kind].mode, ups[kind].delay_seconds = "slow", 0.3
    with pytest.raises(TIMEOUTS):
        call(clients[kind], stream=False, timeout=0.1)

    started = time.monotonic()
    call(clients[kind], stream=False)
    assert time.monotonic() - started >= 0.3
