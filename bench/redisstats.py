"""What the gateway asks of Redis per request, and what Redis holds after a run.

`INFO commandstats` counts every command, including those a Lua script runs, so the
commands the gateway itself sent (its round trips) come from MONITOR, which tags script
commands `[0 lua]` and client commands with their address.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from bench import procs

# Commands of the harness itself, never the gateway's.
HARNESS = frozenset({"info", "config|resetstat", "config", "monitor", "memory|usage", "dbsize"})
_MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ (\S+)\] "([^"]+)"')


def command_calls(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    calls: Counter[str] = Counter()
    for name, values in stats.items():
        command = name.removeprefix("cmdstat_")
        if command not in HARNESS:
            calls[command.upper()] = int(values["calls"])
    return calls


class Monitor:
    """`redis-cli monitor` into a file while a phase runs."""

    def __init__(self, run: procs.Processes, port: int, name: str) -> None:
        self.run = run
        self.path = run.workdir / f"{name}.log"
        self.process = run.start(name, ["redis-cli", "-p", str(port), "monitor"])

    def stop(self) -> tuple[Counter[str], Counter[str]]:
        """(commands sent by clients, commands run inside scripts), by name."""
        self.run.stop(self.process)
        return parse_monitor(self.path)


def parse_monitor(path: Path) -> tuple[Counter[str], Counter[str]]:
    sent: Counter[str] = Counter()
    scripted: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        match = _MONITOR_LINE.match(line)
        if not match:
            continue
        source, command = match.group(1), match.group(2).upper()
        if source == "lua":
            scripted[command] += 1
        elif command.lower() not in HARNESS:
            sent[command] += 1
    return sent, scripted


def per_request(counts: Counter[str], requests: int) -> dict[str, float]:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {name: round(calls / requests, 3) for name, calls in ordered if calls}


def phase_stats(
    calls: Counter[str], sent: Counter[str], scripted: Counter[str], requests: int
) -> dict[str, Any]:
    return {
        "requests": requests,
        "round_trips_per_request": round(sum(sent.values()) / requests, 3),
        "sent_per_request": per_request(sent, requests),
        "scripted_per_request": per_request(scripted, requests),
        "commandstats_per_request": per_request(calls, requests),
    }


def key_state(client: redis.Redis, key_id: str) -> dict[str, Any]:
    """How big one API key's state is: entries and bytes of each of its Redis keys."""
    tag = f"gw:{{{key_id}}}"
    sizes = {
        "usage_records": client.xlen(f"{tag}:usage"),
        "reservations": client.hlen(f"{tag}:resv"),
        "leases": client.zcard(f"{tag}:lease"),
        "window": client.zcard(f"{tag}:window"),
    }
    memory = {
        part: int(client.memory_usage(f"{tag}:{part}", samples=0) or 0)
        for part in ("key", "window", "spend", "resv", "lease", "usage", "totals")
    }
    # Cache entries: under the key's tag (scope key) or shared (scope global).
    cache = sum(1 for _ in client.scan_iter(match=f"{tag}:cache:*", count=1000))
    cache += sum(1 for _ in client.scan_iter(match="gw:cache:*", count=1000))
    return {**sizes, "bytes": memory, "cache_entries": cache}


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])
