"""End to end with the official openai SDK, through the gateway, to stand-in providers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.upstreams import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}
MODELS = [
    pytest.param("gpt", id="openai-upstream"),
    pytest.param("claude", id="anthropic-upstream"),
]
# Stand-in token counts for ask("<3 words>"): words + 3 per message; Anthropic takes the
# system message out of the message list, so it counts one message fewer.
PROMPT_TOKENS = {"gpt": 11, "claude": 8}


def client(gateway_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url + "/v1", api_key=key, max_retries=0)


def aclient(gateway_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key=key, max_retries=0)


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


@pytest.mark.parametrize("model", MODELS)
def test_chat_plain_sync(gateway_url: str, mint: Any, model: str) -> None:
    key, _ = mint()
    done = client(gateway_url, key).chat.completions.create(
        model=model, messages=ask("hello there world")
    )
    assert done.choices[0].message.content == "echo: hello there world"
    assert done.choices[0].finish_reason == "stop"
    assert done.model == model
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (PROMPT_TOKENS[model], 4)


@pytest.mark.parametrize("model", MODELS)
async def test_chat_plain_async(gateway_url: str, mint: Any, model: str) -> None:
    key, _ = mint()
    done = await aclient(gateway_url, key).chat.completions.create(
        model=model, messages=ask("one two three four"), max_tokens=3
    )
    assert done.choices[0].message.content == "echo: one two"
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 3


@pytest.mark.parametrize("model", MODELS)
def test_chat_stream_sync(gateway_url: str, mint: Any, model: str) -> None:
    key, _ = mint()
    stream = client(gateway_url, key).chat.completions.create(
        model=model, messages=ask("stream me please"), stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == "echo: stream me please"
    assert finish == ["stop"]
    assert chunks[-1].usage is not None
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS[model], 4)


@pytest.mark.parametrize("model", MODELS)
async def test_chat_stream_async_without_usage(gateway_url: str, mint: Any, model: str) -> None:
    key, _ = mint()
    stream = await aclient(gateway_url, key).chat.completions.create(
        model=model, messages=ask("no usage here"), stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: no usage here"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks), "the usage-only chunk must be stripped"


@pytest.mark.parametrize("model", MODELS)
async def test_chat_stream_async_with_usage(gateway_url: str, mint: Any, model: str) -> None:
    key, _ = mint()
    stream = await aclient(gateway_url, key).chat.completions.create(
        model=model,
        messages=ask("count me"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "echo: count me"
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_chat_tool_calls_plain(gateway_url: str, mint: Any, model: str) -> None:
    key, _ = mint()
    done = client(gateway_url, key).chat.completions.create(
        model=model, messages=ask("weather in Paris"), tools=[WEATHER_TOOL]
    )
    call = done.choices[0].message.tool_calls[0]
    assert done.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"query": "weather in Paris"}


@pytest.mark.parametrize("model", MODELS)
async def test_chat_tool_calls_stream(gateway_url: str, mint: Any, model: str) -> None:
    key, _ = mint()
    stream = await aclient(gateway_url, key).chat.completions.create(
        model=model, messages=ask("weather in Oslo"), tools=[WEATHER_TOOL], stream=True
    )
    name, arguments, finish = "", "", None
    async for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or ():
            name += call.function.name or ""
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather"
    assert json.loads(arguments) == {"query": "weather in Oslo"}
    assert finish == "tool_calls"


@pytest.mark.parametrize("model", MODELS)
def test_chat_tool_result_round_trip(
    gateway_url: str, mint: Any, model: str, upstreams: dict[str, Upstream]
) -> None:
    key, _ = mint()
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"query": "Rome"}'}}  # fmt: skip
    messages = [
        {"role": "user", "content": "weather in Rome"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    done = client(gateway_url, key).chat.completions.create(model=model, messages=messages)
    assert done.choices[0].message.content.endswith("thanks")
    if model == "claude":
        sent = upstreams["claude"].requests[-1].body["messages"]
        assert sent[1]["content"][0] == {
            "type": "tool_use",
            "id": "call_1",
            "name": "get_weather",
            "input": {"query": "Rome"},
        }
        assert sent[2]["role"] == "user"
        assert sent[2]["content"][0]["type"] == "tool_result"
        assert sent[2]["content"][0]["tool_use_id"] == "call_1"


def test_headers_on_completion(gateway_url: str, mint: Any) -> None:
    key, _ = mint(rate_per_min=10)
    raw = client(gateway_url, key).chat.completions.with_raw_response.create(
        model="gpt", messages=ask("headers")
    )
    assert raw.headers["x-gateway-provider"] == "openai"
    assert raw.headers["x-gateway-cache"] == "miss"
    assert float(raw.headers["x-gateway-cost"]) > 0
    assert raw.headers["x-ratelimit-limit-requests"] == "10"
    assert raw.headers["x-ratelimit-remaining-requests"] == "9"
    reset = raw.headers["x-ratelimit-reset-requests"]  # until the oldest slot frees
    assert reset.endswith("s") and 59.0 <= float(reset[:-1]) <= 60.0
    assert raw.headers["x-request-id"]


def test_gateway_key_never_reaches_upstream(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream]
) -> None:
    key, _ = mint()
    for model in ("gpt", "claude"):
        client(gateway_url, key).chat.completions.create(model=model, messages=ask("secret"))
    sent_openai = upstreams["openai"].requests[-1].headers
    sent_claude = upstreams["claude"].requests[-1].headers
    assert sent_openai["authorization"] == "Bearer sk-upstream-openai"
    assert sent_claude["x-api-key"] == "sk-ant-up"
    for recorded in upstreams["openai"].requests + upstreams["claude"].requests:
        assert key not in json.dumps(recorded.headers) + json.dumps(recorded.body)


def test_max_tokens_defaults_to_model_ceiling(
    gateway_url: str, mint: Any, upstreams: dict[str, Upstream]
) -> None:
    key, _ = mint()
    client(gateway_url, key).chat.completions.create(model="gpt", messages=ask("bounded"))
    assert upstreams["openai"].requests[-1].body["max_tokens"] == 256


def test_models_lists_allowed_models(gateway_url: str, mint: Any) -> None:
    key, _ = mint(allowed_models=["gpt", "claude"])
    listed = client(gateway_url, key).models.list()
    assert sorted(m.id for m in listed.data) == ["claude", "gpt"]


def test_native_complete(gateway_url: str, mint: Any) -> None:
    key, _ = mint()
    response = httpx.post(
        gateway_url + "/api/ai-gateway/complete",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "claude", "messages": [{"role": "user", "content": "native call"}]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["content"] == "echo: native call"
    assert (body["model"], body["provider"], body["cached"]) == ("claude", "claude", False)
    assert (body["input_tokens"], body["output_tokens"]) == (5, 3)
    assert body["cost"] == pytest.approx((5 * 0.001 + 3 * 0.002) / 1000)
