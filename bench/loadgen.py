"""Load: wrk for plain requests, the async client (bench/streamclient.py) for streams."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs

HERE = Path(__file__).resolve().parent
# A run until `limit` responses still ends after this long, should the server stop answering.
LIMIT_SECONDS = 600
WRK_MISSING = "wrk is missing: install it with `apt-get install -y wrk` (Debian package)"


@dataclass(frozen=True)
class Target:
    """Where a row's requests go: a base URL, a path, a bearer key and a model."""

    url: str
    path: str
    key: str
    model: str


def wrk_binary() -> str:
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError(WRK_MISSING)
    return binary


def wrk(
    target: Target,
    concurrency: int,
    *,
    seconds: float = 0,
    limit: int = 0,
    fixed: bool = False,
    stream: bool = False,
    no_store: bool = False,
    salt: str = "",
    cpus: str | None = None,
) -> dict[str, Any]:
    """One wrk run: for `seconds`, or until `limit` responses; returns its WRKJSON line.

    Bodies carry `salt` (random unless given), so no two runs share a cache entry, and
    `fixed` ones can be primed by an earlier run with the same salt.
    """
    duration = f"{max(seconds, 1):.0f}s" if seconds else f"{LIMIT_SECONDS}s"
    args = [target.path, target.key, target.model, "fixed" if fixed else "unique"]
    args += ["1" if stream else "0", salt or new_salt(), str(limit), "1" if no_store else "0"]
    command = [
        wrk_binary(), "-t1", f"-c{concurrency}", f"-d{duration}", "--timeout", "30s",
        "-s", str(HERE / "chat.lua"), target.url, "--", *args,
    ]  # fmt: skip
    return _rates(_run_wrk(procs.pinned(command, cpus)))


def _run_wrk(command: list[str]) -> dict[str, Any]:
    """Run wrk; on the script's WRKLIMIT line interrupt it (it would wait out -d)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    found: dict[str, Any] | None = None
    try:
        for line in process.stdout:
            if line.startswith("WRKLIMIT") and process.poll() is None:
                process.send_signal(signal.SIGINT)
            elif line.startswith("WRKJSON "):
                found = json.loads(line.removeprefix("WRKJSON "))
        _, errors = process.communicate()
    finally:
        if process.poll() is None:  # the harness is being interrupted
            process.kill()
            process.wait()
    if found is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {errors[-500:]}")
    return found


def new_salt() -> str:
    return uuid.uuid4().hex[:12]


def _rates(raw: dict[str, Any]) -> dict[str, Any]:
    errors = sum(raw[k] for k in raw if k.endswith(("_errors", "timeouts")))
    return {
        "requests": raw["requests"],
        "errors": errors,
        "cache_hits": raw["cache_hits"],
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
    }


def stream_client(
    target: Target,
    concurrency: int,
    *,
    seconds: float = 0,
    requests: int = 0,
    fixed: bool = False,
    cpus: str | None = None,
) -> dict[str, Any]:
    """Streamed requests from bench/streamclient.py for `seconds` or `requests`: rates,
    time to first byte and to last byte."""
    command = [
        sys.executable, str(HERE / "streamclient.py"), target.url + target.path,
        "--key", target.key, "--model", target.model, "--concurrency", str(concurrency),
        "--seconds", str(seconds), "--requests", str(requests),
    ]  # fmt: skip
    if fixed:
        command.append("--fixed")
    done = subprocess.run(procs.pinned(command, cpus), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"stream client failed: {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
