"""py-spy on a gateway worker: where the CPU time of a request goes.

`py-spy record --format raw` writes collapsed stacks ("frame;frame;frame count"); self
time is the leaf frame of each sample, total time every frame a sample passes through.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench import procs

PY_SPY = Path(sys.executable).parent / "py-spy"
# Where a frame's file lives decides its share: ours, or the library it belongs to.
PACKAGES = (
    "gateway", "aiohttp", "yarl", "multidict", "redis", "starlette", "uvicorn", "pydantic",
    "msgpack", "orjson", "asyncio", "prometheus_client", "logging",
)  # fmt: skip


def record(
    pid: int, seconds: int, output: Path, cpus: str | None, rate: int = 100
) -> subprocess.Popen[bytes]:
    """Start sampling `pid` (blocking mode: exact stacks, the process pauses per sample)."""
    if not PY_SPY.exists():
        raise RuntimeError(f"py-spy is missing: {sys.executable} -m pip install py-spy")
    command = [
        str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--function",
        "--rate", str(rate), "--duration", str(seconds), "--output", str(output),
    ]  # fmt: skip
    return subprocess.Popen(procs.pinned(command, cpus), stdout=subprocess.DEVNULL)


def package_of(frame: str) -> str:
    """`name (path/file.py:line)` -> the package the file belongs to."""
    path = frame.rpartition("(")[2]
    for package in PACKAGES:
        if f"{package}/" in path or path.startswith(f"{package}."):
            return package
    return "other" if path else "?"


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    callers: dict[str, Counter[str]] = {}
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        weight, frames = int(count), stack.split(";")
        samples += weight
        own[frames[-1]] += weight
        packages[package_of(frames[-1])] += weight
        for child, parent in zip(frames[1:], frames[:-1], strict=False):
            callers.setdefault(child, Counter())[parent] += weight
        for frame in set(frames):
            total[frame] += weight
    # Frames under every sample (the server's entry points) say nothing: left out.
    below_root = Counter({f: n for f, n in total.items() if n < 0.98 * samples})
    return {
        "samples": samples,
        "self": _shares(own, samples, top),
        "total": _shares(below_root, samples, top),
        "packages": _shares(packages, samples, top),
        "gateway": _shares(
            Counter({f: n for f, n in own.items() if package_of(f) == "gateway"}), samples, 15
        ),
        # Who calls the costliest leaves: where a library's cost comes from in our code.
        "callers": {
            name: _shares(callers.get(name, Counter()), samples, 3)
            for name, _ in own.most_common(8)
        },
    }


def _shares(counter: Counter[str], samples: int, top: int) -> list[tuple[str, float]]:
    return [(name, round(100 * n / max(samples, 1), 1)) for name, n in counter.most_common(top)]


def render(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['samples']} samples of the gateway worker (CPU time only), "
        f"c={summary.get('concurrency', 16)} plain misses",
        f"throughput {summary.get('rps_unprofiled', 0):.0f} req/s before py-spy attached, "
        f"{summary.get('rps_profiled', 0):.0f} req/s under it",
    ]
    for title, key in (("self time", "self"), ("total time", "total"),
                       ("self time by package", "packages"),
                       ("self time, the gateway's own functions", "gateway")):  # fmt: skip
        lines += ["", f"top by {title}:"]
        lines += [f"  {pct:5.1f}%  {name}" for name, pct in summary[key]]
    lines += ["", "callers of the top self-time frames (share of samples through each call):"]
    for name, parents in summary["callers"].items():
        lines.append(f"  {name}")
        lines += [f"      {pct:5.1f}%  from {parent}" for parent, pct in parents]
    return "\n".join(lines)
