"""Stand-in LLM providers for end-to-end tests: real HTTP servers on 127.0.0.1.

An `Upstream` speaks the OpenAI Chat Completions or the Anthropic Messages wire format
closely enough for the official SDKs, answers deterministically, and misbehaves on demand
through its `mode`.

How an answer is made when the mode lets it through:

- content: `reply` if set, else "echo: " + the text of the last user message (its string
  content, or its text parts joined with one space).
- input tokens: whitespace-separated words across every message text (and the Anthropic
  `system` text) + 3 per message.
- output tokens: whitespace-separated words of the content.
- stop sequences (`stop` / `stop_sequences`): the content is cut before the earliest one it
  contains; finish "stop" / stop_reason "stop_sequence" with `stop_sequence` set.
- max_tokens (OpenAI: `max_completion_tokens` or `max_tokens`): when the content, after the
  stop sequences, has more words, it keeps that many; finish "length" / "max_tokens".
- tools, unless tool_choice is none: a call to the first tool, or to the forced one, with
  arguments `json.dumps({"query": <last user text>})` (default separators); output tokens
  are the words of that JSON; finish "tool_calls" / "tool_use". Never truncated.

Streams send one piece per word, each keeping the whitespace before its word, so the
pieces join back to the exact content (or tool arguments).

Modes: "ok"; "status:<code>" (the provider's error body for that status); "malformed"
(200 whose body, or second stream event, is not JSON); "cut" (the connection drops halfway
through the body); "stall" (the first part of the body, then `stall_seconds` of silence,
then the rest); "slow" (an "ok" answer; pair it with `delay_seconds`). Every answer,
whatever the mode, first waits `delay_seconds`. Every request is recorded first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Body = dict[str, Any]

_MODES = frozenset({"ok", "malformed", "cut", "stall", "slow"})
_STATUS_MODE = re.compile(r"status:[1-5]\d\d")
_STOP_POLL_SECONDS = 0.05


class CutConnection(Exception):
    """Raised inside a response body so that uvicorn drops the connection mid-response."""


def _hide_cuts(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, CutConnection)


# uvicorn logs every exception escaping the app; a planned cut is not worth a traceback.
logging.getLogger("uvicorn.error").addFilter(_hide_cuts)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass(frozen=True)
class Prompt:
    """What an answer depends on, read out of either wire format."""

    texts: list[str]
    messages: int
    user_text: str
    max_tokens: int | None
    stops: list[str]
    tool: str | None


@dataclass(frozen=True)
class Answer:
    """A provider-neutral answer; `finish` is "end", "length", "stop_sequence" or "tool"."""

    content: str
    tool: str | None
    finish: str
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int


def words(text: str) -> int:
    return len(text.split())


def word_pieces(text: str) -> list[str]:
    """One piece per word, each with the whitespace before it; they join back to `text`."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[len("".join(pieces)) :]
    if not tail:
        return pieces
    if not pieces:
        return [tail]
    return [*pieces[:-1], pieces[-1] + tail]


def answer(prompt: Prompt, reply: str | None) -> Answer:
    input_tokens = sum(words(text) for text in prompt.texts) + 3 * prompt.messages
    if prompt.tool is not None:
        arguments = json.dumps({"query": prompt.user_text})
        return Answer(arguments, prompt.tool, "tool", None, input_tokens, words(arguments))

    content = reply if reply is not None else "echo: " + prompt.user_text
    finish, stop_sequence = "end", None
    found = [(content.find(stop), stop) for stop in prompt.stops if stop and stop in content]
    if found:
        at, stop_sequence = min(found)
        content, finish = content[:at], "stop_sequence"
    if prompt.max_tokens is not None and words(content) > prompt.max_tokens:
        content = "".join(word_pieces(content)[: prompt.max_tokens])
        finish, stop_sequence = "length", None
    return Answer(content, None, finish, stop_sequence, input_tokens, words(content))


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


class Dialect(Protocol):
    """One provider's wire format: its routes, checks, answers and error bodies."""

    path: str
    prefix: str
    garbage_event: bytes

    def refuse(self, headers: Mapping[str, str], body: Body | None) -> tuple[int, Body] | None: ...

    def error(self, status: int, message: str) -> Body: ...

    def prompt(self, body: Body) -> Prompt: ...

    def message(self, body: Body, answer: Answer) -> Body: ...

    def events(self, body: Body, answer: Answer) -> list[bytes]: ...

    def routes(self, upstream: Upstream) -> list[Route]: ...


def text_of(content: Any) -> str:
    """The text of OpenAI message content: a string, or its text parts joined by a space."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return " ".join(part.get("text", "") for part in content if part.get("type") == "text")


_OPENAI_FINISH = {"end": "stop", "length": "length", "stop_sequence": "stop", "tool": "tool_calls"}
_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


class OpenAIDialect:
    path = "/v1/chat/completions"
    prefix = "/v1"
    garbage_event = b"data: {not json\n\n"

    def refuse(self, headers: Mapping[str, str], body: Body | None) -> tuple[int, Body] | None:
        if not headers.get("authorization", "").startswith("Bearer "):
            return 401, self.error(401, "You didn't provide an API key.")
        if body is None:
            return 400, self.error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body.get("model"), str):
            return 400, self.error(400, "you must provide a model parameter")
        if not isinstance(body.get("messages"), list):
            return 400, self.error(400, "Missing required parameter: 'messages'.")
        return None

    def error(self, status: int, message: str) -> Body:
        fallback = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
        kind, code = _OPENAI_ERRORS.get(status, fallback)
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def prompt(self, body: Body) -> Prompt:
        messages = body["messages"]
        users = [m for m in messages if m.get("role") == "user"]
        limit = body.get("max_completion_tokens")
        stop = body.get("stop")
        return Prompt(
            texts=[text_of(m.get("content")) for m in messages],
            messages=len(messages),
            user_text=text_of(users[-1].get("content")) if users else "",
            max_tokens=body.get("max_tokens") if limit is None else limit,
            stops=[stop] if isinstance(stop, str) else list(stop or []),
            tool=self._tool(body),
        )

    def _tool(self, body: Body) -> str | None:
        names = [t["function"]["name"] for t in body.get("tools") or [] if "function" in t]
        choice = body.get("tool_choice")
        if not names or choice == "none":
            return None
        if isinstance(choice, dict) and choice.get("type") == "function":
            return str(choice["function"]["name"])
        return str(names[0])

    def message(self, body: Body, answer: Answer) -> Body:
        message: Body = {"role": "assistant", "content": answer.content, "refusal": None}
        if answer.tool is not None:
            function = {"name": answer.tool, "arguments": answer.content}
            call = {"id": new_id("call_"), "type": "function", "function": function}
            message.update(content=None, tool_calls=[call])
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": _OPENAI_FINISH[answer.finish],
        }
        return {**self._head(body, "chat.completion"), "choices": [choice], "usage": _usage(answer)}

    def events(self, body: Body, answer: Answer) -> list[bytes]:
        head = self._head(body, "chat.completion.chunk")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if include_usage:
            head["usage"] = None

        def chunk(delta: Body, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse({**head, "choices": [choice]})

        deltas = _tool_deltas(answer) if answer.tool else _text_deltas(answer)
        frames = [chunk(delta) for delta in deltas]
        frames.append(chunk({}, _OPENAI_FINISH[answer.finish]))
        if include_usage:
            frames.append(sse({**head, "choices": [], "usage": _usage(answer)}))
        return [*frames, b"data: [DONE]\n\n"]

    def routes(self, upstream: Upstream) -> list[Route]:
        return [Route("/v1/models", upstream.models, methods=["GET"])]

    def _head(self, body: Body, kind: str) -> Body:
        return {
            "id": new_id("chatcmpl-"),
            "object": kind,
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": None,
        }


def _usage(answer: Answer) -> Body:
    total = answer.input_tokens + answer.output_tokens
    return {
        "prompt_tokens": answer.input_tokens,
        "completion_tokens": answer.output_tokens,
        "total_tokens": total,
    }


def _text_deltas(answer: Answer) -> list[Body]:
    first: Body = {"role": "assistant", "content": "", "refusal": None}
    return [first, *({"content": piece} for piece in word_pieces(answer.content))]


def _tool_deltas(answer: Answer) -> list[Body]:
    function = {"name": answer.tool, "arguments": ""}
    call = {"index": 0, "id": new_id("call_"), "type": "function", "function": function}
    first: Body = {"role": "assistant", "content": None, "tool_calls": [call]}
    pieces = word_pieces(answer.content)
    return [first, *({"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces)]


def _dialect(kind: str) -> Dialect:
    if kind == "openai":
        return OpenAIDialect()
    if kind == "anthropic":
        # Imported here because the Anthropic dialect builds on this module.
        from tests.upstream_anthropic import AnthropicDialect

        return AnthropicDialect()
    raise ValueError(f"unknown upstream kind {kind!r}")


class Upstream:
    """One stand-in provider served by uvicorn in a background thread on a free 127.0.0.1 port."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.dialect = _dialect(kind)
        self.base_url = ""
        self.requests: list[Recorded] = []
        self.stall_seconds = 30.0
        self.delay_seconds = 0.0
        self.reply: str | None = None
        self._mode = "ok"
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in _MODES and not _STATUS_MODE.fullmatch(value):
            raise ValueError(f"unknown upstream mode {value!r}")
        self._mode = value

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
        self.mode, self.reply, self.delay_seconds = "ok", None, 0.0

    def start(self) -> Upstream:
        routes = [Route(self.dialect.path, self.chat, methods=["POST"])]
        app = Starlette(routes=routes + self.dialect.routes(self))
        self._server, self._thread = _serve(app, name=f"upstream-{self.kind}")
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}{self.dialect.prefix}"
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def chat(self, request: Request) -> Response:
        body = await self._record(request)
        await self._pause(self.delay_seconds)
        mode = self.mode

        refusal = self.dialect.refuse(request.headers, body)
        if refusal is not None:
            return JSONResponse(refusal[1], status_code=refusal[0])
        assert body is not None  # refuse() turns a missing body away
        if mode.startswith("status:"):
            status = int(mode.removeprefix("status:"))
            message = f"The stand-in upstream answered {status} as its mode asked."
            return JSONResponse(self.dialect.error(status, message), status_code=status)

        reply = answer(self.dialect.prompt(body), self.reply)
        if body.get("stream") is True:
            return self._stream(self.dialect.events(body, reply), mode)
        return self._whole(orjson.dumps(self.dialect.message(body, reply)), mode)

    async def models(self, request: Request) -> Response:
        await self._record(request)
        names = ["gpt-4o-mini", "gpt-4o", "o3-mini"]
        listed = [{"id": n, "object": "model", "created": 0, "owned_by": "openai"} for n in names]
        return JSONResponse({"object": "list", "data": listed})

    async def _record(self, request: Request) -> Body | None:
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            body = None
        headers = {name.lower(): value for name, value in request.headers.items()}
        with self._lock:
            self.requests.append(Recorded(request.url.path, headers, body or {}))
        return body

    def _stream(self, frames: list[bytes], mode: str) -> Response:
        if mode == "malformed":
            frames = [frames[0], self.dialect.garbage_event]
        headers = {"cache-control": "no-cache"}
        flow = self._flow(frames, mode)
        return StreamingResponse(flow, media_type="text/event-stream", headers=headers)

    def _whole(self, content: bytes, mode: str) -> Response:
        if mode == "malformed":
            content = b'{"id": "truncated", <html>Bad Gateway</html>'
        half = len(content) // 2
        flow = self._flow([content[:half], content[half:]], mode)
        headers = {"content-length": str(len(content))}
        return StreamingResponse(flow, media_type="application/json", headers=headers)

    async def _flow(self, frames: list[bytes], mode: str) -> AsyncIterator[bytes]:
        cut_at = max(1, len(frames) // 2) if mode == "cut" else None
        for index, frame in enumerate(frames):
            if index == cut_at:
                raise CutConnection
            yield frame
            if mode == "stall" and index == 0:
                await self._pause(self.stall_seconds)

    async def _pause(self, seconds: float) -> None:
        """Sleeps, waking early once the server stops so that stop() never waits out a stall."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._stopping():
            await asyncio.sleep(min(left, _STOP_POLL_SECONDS))

    def _stopping(self) -> bool:
        return self._server is None or self._server.should_exit


def _serve(app: Starlette, name: str) -> tuple[uvicorn.Server, threading.Thread]:
    """Runs `app` on a free 127.0.0.1 port in a daemon thread; returns once it listens."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", log_config=None, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the stand-in upstream {name} did not start")
        time.sleep(0.005)
    return server, thread


def openai_upstream() -> Upstream:
    """A started stand-in for the OpenAI Chat Completions API."""
    return Upstream("openai").start()


def anthropic_upstream() -> Upstream:
    """A started stand-in for the Anthropic Messages API."""
    return Upstream("anthropic").start()
