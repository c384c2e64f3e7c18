"""Prometheus metrics, correct across uvicorn workers.

`gateway serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any worker
starts, so each worker writes its samples there and /metrics sums them: the open
reservations gauge as the sum over live workers (a scrape first drops the files of
workers that died), a key's cap use as the value its latest admission reported,
whichever worker made it. An app built without it (tests, embedding) keeps the ordinary
in-process registry.

Labels carry key ids, never keys; `metrics.per_key_labels: false` drops the key label
for fleets with many keys, and with it the per-key cap gauge.
"""

from __future__ import annotations

import functools
import glob
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/api/ai-gateway/complete"})
REFUSAL_REASONS = {
    400: "bad_request", 401: "unauthorized", 402: "spend_cap", 403: "forbidden",
    404: "not_found", 408: "slow_client", 413: "too_large", 429: "rate_limited",
}  # fmt: skip
_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

REQUESTS = Counter(
    "gateway_requests_total", "Completions by outcome.", ["model", "provider", "status", "cache"]
)
OVERHEAD = Histogram(
    "gateway_overhead_seconds", "Time in the gateway itself: total minus upstream.",
    ["model"], buckets=_FAST,
)  # fmt: skip
UPSTREAM = Histogram(
    "gateway_upstream_seconds", "Time waiting on providers.", ["provider"], buckets=_SLOW
)
TOKENS = Counter("gateway_tokens_total", "Tokens served.", ["model", "direction"])
SPEND = Counter("gateway_spend_usd_total", "Settled spend in USD.", ["model", "key"])
REFUSALS = Counter("gateway_refusals_total", "Completions refused, by reason.", ["reason"])
FALLBACKS = Counter(
    "gateway_fallbacks_total", "Routes abandoned for the next one.", ["model", "provider"]
)
PROVIDER_ERRORS = Counter(
    "gateway_provider_errors_total", "Provider failures, by kind.", ["provider", "kind"]
)
OPEN_RESERVATIONS = Gauge(
    "gateway_open_reservations", "Admitted requests not yet settled.", multiprocess_mode="livesum"
)
KEY_CAP_USED = Gauge(
    "gateway_key_cap_used_ratio",
    "(Settled + reserved spend) / cap at the key's latest admission decision; the larger of "
    "the monthly and lifetime ratios. Keys without a cap have none.",
    ["key"], multiprocess_mode="mostrecent",
)  # fmt: skip


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: prometheus_client checks and converts the
    labels and takes a lock on every call. Children are never removed, so a cached one
    stays the metric's own."""
    return metric.labels(*labels)


class Recorder:
    """Turns one finished request's log fields into samples."""

    def __init__(self, per_key_labels: bool) -> None:
        self.per_key_labels = per_key_labels

    def request(self, path: str, status: int, seconds: float, fields: dict[str, Any]) -> None:
        if path not in COMPLETION_PATHS:
            return
        model = str(fields.get("model", "-"))
        provider = str(fields.get("provider", "-"))
        cache = str(fields.get("cache", "-"))
        child(REQUESTS, model, provider, str(status), cache).inc()
        if status in REFUSAL_REASONS:
            child(REFUSALS, REFUSAL_REASONS[status]).inc()
        upstream = float(fields.get("upstream_seconds", 0.0))
        child(OVERHEAD, model).observe(max(seconds - upstream, 0.0))
        if upstream:
            child(UPSTREAM, provider).observe(upstream)
        for direction in ("input", "output"):
            tokens = fields.get(f"{direction}_tokens")
            if tokens and cache != "hit":  # a hit consumed no provider tokens
                child(TOKENS, model, direction).inc(tokens)
        cost = fields.get("cost")
        if cost:
            key = str(fields.get("key", "-")) if self.per_key_labels else "-"
            child(SPEND, model, key).inc(cost)


def provider_failure(model: str, provider: str, reason: str) -> None:
    PROVIDER_ERRORS.labels(provider, _kind(reason)).inc()
    FALLBACKS.labels(model, provider).inc()


def _kind(reason: str) -> str:
    if reason.startswith("timed out"):
        return "timeout"
    if reason.startswith("connection"):
        return "connection"
    if reason.startswith("HTTP "):
        return "http_" + reason[5:8]
    return "invalid_answer"


async def scrape(request: Request) -> Response:
    """GET /metrics: every worker's samples when in multiprocess mode."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        forget_dead_workers(folder)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def forget_dead_workers(folder: str) -> None:
    """Drop the live gauges of workers that are gone: a crashed worker never says so, and
    its in-flight count would otherwise stay in the sum for good."""
    for path in glob.glob(os.path.join(folder, "gauge_live*_*.db")):
        pid = os.path.basename(path)[: -len(".db")].rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), folder)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, just not ours to signal
    return True
