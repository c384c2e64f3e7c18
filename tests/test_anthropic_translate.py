"""Translation to and from the Anthropic Messages API: requests, answers, streams."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.errors import BadRequest
from gateway.providers.anthropic_request import to_messages_request
from gateway.providers.anthropic_translate import StreamTranslator, to_chat_completion

Json = dict[str, Any]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def translate(**fields: Any) -> Json:
    body = {"model": "claude", "messages": [{"role": "user", "content": "hi"}], **fields}
    return to_messages_request(body, "claude-sonnet-4-5", 1024, stream=False)


def anthropic_message(content: list[Any], stop_reason: str | None = "end_turn") -> Json:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 7},
    }


def test_to_messages_request_minimal() -> None:
    assert translate() == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }


def test_to_messages_request_stream_flag() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert to_messages_request(body, "m", 10, stream=True)["stream"] is True
    assert "stream" not in to_messages_request(body, "m", 10, stream=False)


def test_to_messages_request_joins_system_and_developer() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "No emoji."},
    ]
    request = translate(messages=messages)
    assert request["system"] == "Be brief.\n\nAnswer in French.\n\nNo emoji."
    assert request["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def test_to_messages_request_without_system_omits_it() -> None:
    assert "system" not in translate()


def test_to_messages_request_tool_round_trip() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "24C"}]},
        {"role": "user", "content": "Thanks, which is warmer?"},
    ]
    assert translate(messages=messages)["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "24C"},
                {"type": "text", "text": "Thanks, which is warmer?"},
            ],
        },
    ]


def test_to_messages_request_assistant_tool_calls_without_content() -> None:
    call = {"id": "t1", "type": "function", "function": {"name": "ping", "arguments": ""}}
    messages = [
        {"role": "user", "content": "ping"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    assert translate(messages=messages)["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "t1", "name": "ping", "input": {}}],
    }


def test_to_messages_request_merges_consecutive_same_role() -> None:
    messages = [
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "three"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "four"},
    ]
    assert translate(messages=messages)["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "three"}, {"type": "text", "text": "four"}],
        },
    ]


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param("{not json", id="unparseable"),
        pytest.param("[1, 2]", id="not-an-object"),
        pytest.param(42, id="not-a-string"),
    ],
)
def test_to_messages_request_bad_arguments_refused(arguments: object) -> None:
    call = {"id": "t1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]
    with pytest.raises(BadRequest, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        translate(messages=messages)


@pytest.mark.parametrize(
    ("url", "source"),
    [
        pytest.param(
            "data:image/png;base64,iVBORw0KGgo=",
            {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
            id="data-url",
        ),
        pytest.param(
            "https://example.com/cat.jpg",
            {"type": "url", "url": "https://example.com/cat.jpg"},
            id="https-url",
        ),
        pytest.param(
            "http://example.com/cat.jpg",
            {"type": "url", "url": "http://example.com/cat.jpg"},
            id="http-url",
        ),
    ],
)
def test_to_messages_request_images(url: str, source: Json) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
    ]
    request = translate(messages=[{"role": "user", "content": content}])
    assert request["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": source},
    ]


@pytest.mark.parametrize(
    ("part", "field"),
    [
        pytest.param(
            {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}},
            r"messages\[0\]\.content\[0\]\.image_url\.url",
            id="ftp-url",
        ),
        pytest.param(
            {"type": "image_url", "image_url": {"url": "data:image/png,raw"}},
            r"messages\[0\]\.content\[0\]\.image_url\.url",
            id="data-url-not-base64",
        ),
        pytest.param(
            {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}},
            r"messages\[0\]\.content\[0\]\.type",
            id="audio",
        ),
    ],
)
def test_to_messages_request_unsupported_parts_refused(part: Json, field: str) -> None:
    with pytest.raises(BadRequest, match=field):
        translate(messages=[{"role": "user", "content": [part]}])


def test_to_messages_request_tools() -> None:
    bare = {"type": "function", "function": {"name": "now"}}
    assert translate(tools=[WEATHER_TOOL, bare])["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, None, id="absent"),
        pytest.param({"tool_choice": "auto"}, {"type": "auto"}, id="auto"),
        pytest.param({"tool_choice": "required"}, {"type": "any"}, id="required"),
        pytest.param({"tool_choice": "none"}, {"type": "none"}, id="none"),
        pytest.param(
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            {"type": "tool", "name": "get_weather"},
            id="named",
        ),
        pytest.param(
            {"parallel_tool_calls": False},
            {"type": "auto", "disable_parallel_tool_use": True},
            id="serial-default",
        ),
        pytest.param(
            {"tool_choice": "required", "parallel_tool_calls": False},
            {"type": "any", "disable_parallel_tool_use": True},
            id="serial-required",
        ),
        pytest.param(
            {"tool_choice": "none", "parallel_tool_calls": False},
            {"type": "none"},
            id="serial-none",
        ),
        pytest.param({"parallel_tool_calls": True}, None, id="parallel-true"),
    ],
)
def test_to_messages_request_tool_choice(fields: Json, expected: Json | None) -> None:
    assert translate(tools=[WEATHER_TOOL], **fields).get("tool_choice") == expected


def test_to_messages_request_tool_choice_without_tools_dropped() -> None:
    request = translate(tool_choice="auto")
    assert "tool_choice" not in request
    assert "tools" not in request


def test_to_messages_request_unknown_tool_choice_refused() -> None:
    with pytest.raises(BadRequest, match="tool_choice"):
        translate(tools=[WEATHER_TOOL], tool_choice={"type": "allowed_tools"})


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        pytest.param("END", ["END"], id="string"),
        pytest.param(["END", "\n\nHuman:"], ["END", "\n\nHuman:"], id="list"),
        pytest.param(None, None, id="none"),
        pytest.param([], None, id="empty-list"),
    ],
)
def test_to_messages_request_stop(stop: object, expected: list[str] | None) -> None:
    assert translate(stop=stop).get("stop_sequences") == expected


@pytest.mark.parametrize(
    ("temperature", "expected"),
    [
        pytest.param(0, 0.0, id="zero"),
        pytest.param(0.7, 0.7, id="in-range"),
        pytest.param(1, 1.0, id="one"),
        pytest.param(1.5, 1.0, id="above-anthropic-max"),
        pytest.param(2, 1.0, id="openai-max"),
    ],
)
def test_to_messages_request_temperature_clamped(temperature: float, expected: float) -> None:
    assert translate(temperature=temperature)["temperature"] == expected


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        pytest.param(0.9, 0.9, id="kept"),
        pytest.param(1, None, id="default-dropped"),
    ],
)
def test_to_messages_request_top_p(top_p: float, expected: float | None) -> None:
    assert translate(top_p=top_p).get("top_p") == expected


def test_to_messages_request_user_becomes_metadata() -> None:
    assert translate(user="user-42")["metadata"] == {"user_id": "user-42"}


@pytest.mark.parametrize("n", [pytest.param(2, id="two"), pytest.param(5, id="five")])
def test_to_messages_request_n_above_one_refused(n: int) -> None:
    with pytest.raises(BadRequest, match=r"^n: "):
        translate(n=n)


def test_to_messages_request_n_one_accepted() -> None:
    assert "n" not in translate(n=1)


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        pytest.param("end_turn", "stop", id="end_turn"),
        pytest.param("stop_sequence", "stop", id="stop_sequence"),
        pytest.param("max_tokens", "length", id="max_tokens"),
        pytest.param("tool_use", "tool_calls", id="tool_use"),
        pytest.param("refusal", "content_filter", id="refusal"),
        pytest.param("pause_turn", "stop", id="pause_turn"),
        pytest.param(None, "stop", id="null"),
    ],
)
def test_to_chat_completion_finish_reason(stop_reason: str | None, finish_reason: str) -> None:
    message = anthropic_message([{"type": "text", "text": "ok"}], stop_reason)
    assert to_chat_completion(message, "gpt-alias")["choices"][0]["finish_reason"] == finish_reason


def test_to_chat_completion_text() -> None:
    content = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}]
    completion = to_chat_completion(anthropic_message(content), "my-model")
    assert isinstance(completion.pop("created"), int)
    assert completion == {
        "id": "msg_01",
        "object": "chat.completion",
        "model": "my-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, world."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }


def test_to_chat_completion_tool_use() -> None:
    content = [
        {"type": "thinking", "thinking": "...", "signature": "sig"},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    choice = to_chat_completion(anthropic_message(content, "tool_use"), "m")["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }


@pytest.mark.parametrize(
    ("usage", "prompt_tokens"),
    [
        pytest.param({"input_tokens": 12, "output_tokens": 7}, 12, id="no-cache"),
        pytest.param(
            {
                "input_tokens": 12,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 2000,
                "output_tokens": 7,
            },
            2112,
            id="cache-write-and-read",
        ),
        pytest.param(
            {
                "input_tokens": 12,
                "cache_creation_input_tokens": None,
                "cache_read_input_tokens": 30,
                "output_tokens": 7,
            },
            42,
            id="cache-null",
        ),
    ],
)
def test_to_chat_completion_usage_counts_cache(usage: Json, prompt_tokens: int) -> None:
    message = {**anthropic_message([{"type": "text", "text": "ok"}]), "usage": usage}
    assert to_chat_completion(message, "m")["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 7,
        "total_tokens": prompt_tokens + 7,
    }


@pytest.mark.parametrize(
    "message",
    [
        pytest.param("not a message", id="not-a-dict"),
        pytest.param(None, id="null"),
        pytest.param({**anthropic_message([]), "content": None}, id="content-null"),
        pytest.param({**anthropic_message([]), "content": "text"}, id="content-string"),
        pytest.param(
            {k: v for k, v in anthropic_message([]).items() if k != "usage"}, id="no-usage"
        ),
        pytest.param({**anthropic_message([]), "usage": {"output_tokens": 1}}, id="no-input"),
        pytest.param({**anthropic_message([]), "usage": {"input_tokens": 1}}, id="no-output"),
        pytest.param(
            {**anthropic_message([]), "usage": {"input_tokens": "1", "output_tokens": 1}},
            id="tokens-string",
        ),
        pytest.param({**anthropic_message([]), "id": None}, id="no-id"),
        pytest.param(anthropic_message(["text"]), id="block-not-dict"),
        pytest.param(anthropic_message([{"type": "text", "text": 3}]), id="text-not-string"),
        pytest.param(
            anthropic_message([{"type": "tool_use", "id": "t", "name": "f", "input": "{}"}]),
            id="tool-input-string",
        ),
    ],
)
def test_to_chat_completion_malformed_raises(message: object) -> None:
    with pytest.raises(ValueError):
        to_chat_completion(message, "m")


def message_start(usage: Json | None = None) -> Json:
    message = anthropic_message([], None)
    message["usage"] = usage or {"input_tokens": 25, "output_tokens": 1}
    return {"type": "message_start", "message": message}


TEXT_EVENTS: list[tuple[str, Json]] = [
    ("message_start", message_start()),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
    ),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo!"}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 15},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
]


def json_delta(index: int, partial: str) -> tuple[str, Json]:
    delta = {"type": "input_json_delta", "partial_json": partial}
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def tool_block(index: int, tool_id: str) -> tuple[str, Json]:
    block = {"type": "tool_use", "id": tool_id, "name": "get_weather", "input": {}}
    return "content_block_start", {
        "type": "content_block_start",
        "index": index,
        "content_block": block,
    }


TOOL_EVENTS: list[tuple[str, Json]] = [
    (
        "message_start",
        message_start({"input_tokens": 5, "cache_read_input_tokens": 400, "output_tokens": 1}),
    ),
    TEXT_EVENTS[1],
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Ok."}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    tool_block(1, "toolu_a"),
    json_delta(1, ""),
    json_delta(1, '{"ci'),
    json_delta(1, 'ty": "Par'),
    json_delta(1, 'is"}'),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    tool_block(2, "toolu_b"),
    json_delta(2, '{"city": "Rome"}'),
    ("content_block_stop", {"type": "content_block_stop", "index": 2}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 61},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
]


def feed_all(translator: StreamTranslator, events: list[tuple[str, Json]]) -> list[Json]:
    return [chunk for event, data in events for chunk in translator.feed(event, data)]


def chunk(translator: StreamTranslator, delta: Json, finish_reason: str | None = None) -> Json:
    return {
        "id": "msg_01",
        "object": "chat.completion.chunk",
        "created": translator.created,
        "model": "my-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def test_stream_translator_text() -> None:
    translator = StreamTranslator("my-model")
    chunks = feed_all(translator, TEXT_EVENTS)

    assert chunks == [
        chunk(translator, {"role": "assistant", "content": ""}),
        chunk(translator, {"content": "Hel"}),
        chunk(translator, {"content": "lo!"}),
        chunk(translator, {}, "stop"),
    ]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello!"
    assert (translator.input_tokens, translator.output_tokens) == (25, 15)
    assert translator.finish_reason == "stop"
    assert translator.done


def test_stream_translator_tool_use() -> None:
    translator = StreamTranslator("my-model")
    chunks = feed_all(translator, TOOL_EVENTS)

    def call(index: int, arguments: str) -> Json:
        return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}

    def start(index: int, tool_id: str) -> Json:
        function = {"name": "get_weather", "arguments": ""}
        return {
            "tool_calls": [
                {"index": index, "id": tool_id, "type": "function", "function": function}
            ]
        }

    assert chunks == [
        chunk(translator, {"role": "assistant", "content": ""}),
        chunk(translator, {"content": "Ok."}),
        chunk(translator, start(0, "toolu_a")),
        chunk(translator, call(0, '{"ci')),
        chunk(translator, call(0, 'ty": "Par')),
        chunk(translator, call(0, 'is"}')),
        chunk(translator, start(1, "toolu_b")),
        chunk(translator, call(1, '{"city": "Rome"}')),
        chunk(translator, {}, "tool_calls"),
    ]
    arguments = ["", ""]
    for c in chunks:
        for tool_call in c["choices"][0]["delta"].get("tool_calls", []):
            arguments[tool_call["index"]] += tool_call["function"]["arguments"]
    assert [orjson.loads(a) for a in arguments] == [{"city": "Paris"}, {"city": "Rome"}]
    assert (translator.input_tokens, translator.output_tokens) == (405, 61)
    assert translator.finish_reason == "tool_calls"


def test_stream_translator_usage_chunk() -> None:
    translator = StreamTranslator("my-model")
    feed_all(translator, TOOL_EVENTS)
    assert translator.usage_chunk() == {
        "id": "msg_01",
        "object": "chat.completion.chunk",
        "created": translator.created,
        "model": "my-model",
        "choices": [],
        "usage": {"prompt_tokens": 405, "completion_tokens": 61, "total_tokens": 466},
    }


def test_stream_translator_state_before_end() -> None:
    translator = StreamTranslator("my-model")
    feed_all(translator, TEXT_EVENTS[:5])
    assert (translator.input_tokens, translator.output_tokens) == (25, 1)
    assert translator.finish_reason is None
    assert not translator.done


def test_stream_translator_message_delta_input_tokens_cumulative() -> None:
    translator = StreamTranslator("m")
    translator.feed("message_start", message_start())
    usage = {"input_tokens": 30, "cache_read_input_tokens": 10, "output_tokens": 9}
    translator.feed("message_delta", {"delta": {"stop_reason": "max_tokens"}, "usage": usage})
    assert (translator.input_tokens, translator.output_tokens) == (40, 9)
    assert translator.finish_reason == "length"


def test_stream_translator_error_event() -> None:
    translator = StreamTranslator("m")
    translator.feed("message_start", message_start())
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(ValueError, match="Overloaded"):
        translator.feed("error", error)


def test_stream_translator_unknown_event_ignored() -> None:
    translator = StreamTranslator("m")
    translator.feed("message_start", message_start())
    assert translator.feed("some_future_event", {"type": "some_future_event"}) == []


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([("content_block_start", TEXT_EVENTS[1][1])], id="before-message-start"),
        pytest.param([("message_start", {"type": "message_start"})], id="start-without-message"),
        pytest.param([("message_start", [])], id="data-not-dict"),
        pytest.param(
            [("message_start", message_start()), ("content_block_delta", {"index": 0})],
            id="delta-without-delta",
        ),
        pytest.param(
            [
                ("message_start", message_start()),
                (
                    "content_block_delta",
                    {"index": 0, "delta": {"type": "text_delta", "text": None}},
                ),
            ],
            id="text-not-string",
        ),
        pytest.param(
            [("message_start", message_start()), json_delta(0, "{}")],
            id="json-delta-for-text-block",
        ),
        pytest.param(
            [("message_start", message_start()), ("message_delta", {"delta": {}, "usage": 3})],
            id="usage-not-dict",
        ),
    ],
)
def test_stream_translator_malformed_raises(events: list[tuple[str, object]]) -> None:
    translator = StreamTranslator("m")
    with pytest.raises(ValueError):
        for event, data in events:
            translator.feed(event, data)


def test_openai_sdk_accepts_translations() -> None:
    for events in (TEXT_EVENTS, TOOL_EVENTS):
        translator = StreamTranslator("my-model")
        for c in [*feed_all(translator, events), translator.usage_chunk()]:
            assert ChatCompletionChunk.model_validate(c).model_dump(exclude_unset=True) == c

    content = [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    completion = to_chat_completion(anthropic_message(content, "tool_use"), "my-model")
    parsed = ChatCompletion.model_validate(completion)
    assert parsed.choices[0].message.tool_calls is not None
    assert parsed.model_dump(exclude_unset=True) == completion
