"""The upstream stand-in: nginx answering fixed OpenAI bodies from memory.

nginx cannot branch on a request body, so the plain and the streamed answer live under two
base URLs, and the gateway's config routes one model to each:

    POST /plain/v1/chat/completions    a chat.completion (application/json)
    POST /stream/v1/chat/completions   an SSE stream: role, 5 content chunks, finish, usage,
                                       [DONE] (text/event-stream)

Both are `return 200 '...'` from memory: no disk, no upstream of its own, no access log.
"""

from __future__ import annotations

import json
import pwd
from pathlib import Path

MODEL = "gpt-bench"
CREATED = 1_700_000_000
WORDS = ["The", " gateway", " is", " not", " the", " bottleneck."]
USAGE = {"prompt_tokens": 24, "completion_tokens": len(WORDS), "total_tokens": 24 + len(WORDS)}


def completion() -> dict[str, object]:
    message = {"role": "assistant", "content": "".join(WORDS)}
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
        "usage": USAGE,
        "system_fingerprint": "fp_bench",
    }


def _chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [choice],
        "usage": None,
    }


def stream_chunks() -> list[dict[str, object]]:
    chunks = [_chunk({"role": "assistant", "content": ""})]
    chunks += [_chunk({"content": word}) for word in WORDS]
    chunks.append(_chunk({}, "stop"))
    usage = {**_chunk({}), "choices": [], "usage": USAGE}
    return [*chunks, usage]


def sse_body() -> str:
    events = [f"data: {json.dumps(c, separators=(',', ':'))}\n\n" for c in stream_chunks()]
    return "".join(events) + "data: [DONE]\n\n"


def _quoted(text: str) -> str:
    """An nginx single-quoted string; `$` would start a variable, so none may appear."""
    if "$" in text:
        raise ValueError("nginx would read $ as a variable")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def nginx_conf(port: int, workdir: Path, workers: int = 1) -> str:
    plain = json.dumps(completion(), separators=(",", ":"))
    user = pwd.getpwuid(0).pw_name  # workers keep root's rights on the temp dir
    return f"""
daemon off;
master_process on;
worker_processes {workers};
user {user};
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /plain/v1/chat/completions {{
            default_type application/json;
            return 200 {_quoted(plain)};
        }}
        location = /stream/v1/chat/completions {{
            default_type text/event-stream;
            add_header cache-control no-cache;
            return 200 {_quoted(sse_body())};
        }}
        location = /healthz {{ return 200 'ok'; }}
    }}
}}
"""
