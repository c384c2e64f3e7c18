"""Instructions a gateway worker runs per request, counted by callgrind: repeatable on a
busy or shared machine, where CPU seconds and latencies move by tens of percent between
runs of the same code.

    .venv/bin/python bench/instructions.py                   # plain misses, this checkout
    .venv/bin/python bench/instructions.py --kind hit --requests 500
    .venv/bin/python bench/instructions.py --source ../other-checkout   # compare two trees

Starts the bench's Redis and nginx, and `gateway serve --workers 1` under
`valgrind --tool=callgrind` with instrumentation off; sends 200 requests at c=1 (wrk) to
warm up, switches instrumentation on, zeroes the counters, sends `--requests` more and
dumps. Instructions per request = the dump's total / the requests answered, each request
with its admission, upstream call, response and settlement (it waits for the last
settlement before the dump). User-space instructions only: system calls and the cost of
waking an idle core are not in it (bench/run.py measures time). Needs Debian's valgrind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, procs, services

WARM_UP = 200


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kind", choices=("miss", "hit", "stream"), default="miss")
    parser.add_argument("--requests", type=int, default=300, help="counted requests (300)")
    parser.add_argument(
        "--source", type=Path, default=services.ROOT, help="the gateway tree to run (this one)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y valgrind")
    run = procs.Processes(Path(tempfile.mkdtemp(prefix="gw-instructions-")))
    try:
        per_request, answered = count(run, args.source.resolve(), args.kind, args.requests)
    finally:
        run.stop_all()
    print(f"{args.kind}: {per_request:,.0f} instructions per request ({answered} requests)")
    print(f"source: {args.source.resolve()}")


def count(run: procs.Processes, source: Path, kind: str, requests: int) -> tuple[float, int]:
    redis = services.start_redis(run, "0")
    upstream = services.start_nginx(run, "0")
    config = run.workdir / "gateway.yaml"
    config.write_text(yaml.safe_dump(services.gateway_config(upstream)))
    dump = run.workdir / "callgrind.out"
    env = {
        **os.environ,
        "PYTHONPATH": str(source),  # ahead of the installed package: `--source` is what runs
        "PYTHONHASHSEED": "0",  # the same dict layouts, run after run
        "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis.connection_pool.connection_kwargs['port']}/0",
        "GATEWAY_ADMIN_KEY": services.ADMIN_KEY,
        "GATEWAY_DATA_DIR": str(run.workdir / "gateway-data"),
        "GATEWAY_LOG_LEVEL": "WARNING",
        "BENCH_UPSTREAM_KEY": services.UPSTREAM_KEY,
    }
    port = procs.free_port()
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}",
        str(services.BIN / "python"), "-m", "gateway", "serve", "--port", str(port),
        "--workers", "1", "--config", str(config),
    ]  # fmt: skip
    # `python -m` puts the working folder first on the path, ahead of PYTHONPATH.
    process = run.start("gateway", procs.pinned(command, "1"), env, cwd=source)
    gateway = services.Gateway(port, process.pid, 1)
    ready = lambda: httpx.get(gateway.url + "/readyz", timeout=30).is_success  # noqa: E731
    procs.wait_until(ready, "the gateway under valgrind", timeout=300)
    gateway.key = services.mint_key(gateway)
    model = services.STREAM if kind == "stream" else services.PLAIN
    target = loadgen.Target(gateway.url, "/v1/chat/completions", gateway.key, model)
    salt = loadgen.new_salt()

    def send(limit: int) -> dict[str, Any]:
        fixed, stream = kind == "hit", kind == "stream"
        return loadgen.wrk(target, 1, limit=limit, cpus="0", fixed=fixed, stream=stream, salt=salt)

    send(WARM_UP)
    control(process.pid, "--instr=on")
    time.sleep(1)
    control(process.pid, "--zero")
    row = send(requests)
    time.sleep(2)  # the last settlement runs after its response
    control(process.pid, "--dump")
    if row["errors"]:
        raise SystemExit(f"{row['errors']} requests failed: see {run.workdir}")
    newest = max(run.workdir.glob("callgrind.out*"), key=lambda path: path.stat().st_mtime)
    return total_instructions(newest) / row["requests"], row["requests"]


def control(pid: int, action: str) -> None:
    subprocess.run(["callgrind_control", action, str(pid)], check=True, capture_output=True)


def total_instructions(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


if __name__ == "__main__":
    main()
