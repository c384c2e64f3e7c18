"""The gateway's benchmark: one command, everything on 127.0.0.1, everything stopped after.

    .venv/bin/python bench/run.py            # full run (~6 min idle), writes bench/results.json
    .venv/bin/python bench/run.py --quick    # smoke run (~2 min)
    .venv/bin/python bench/run.py --profile  # py-spy on the worker under c=16 misses

See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs, profiling, report
from bench.phases import Phases

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short rows, a short long run")
    mode.add_argument("--profile", action="store_true", help="py-spy the worker, then stop")
    parser.add_argument("--long", type=int, help="requests of the long run (200000; quick 20000)")
    parser.add_argument("--long-seconds", type=float, help="cap of the long run (900; quick 30)")
    parser.add_argument("--seconds", type=float, help="duration of each row (6; quick 2)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--quiet-seconds",
        type=float,
        help="before each row, wait up to this long for other processes to go idle (15; quick 2)",
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM rows")
    parser.add_argument("--litellm", action="store_true", help="LiteLLM rows in --quick too")
    parser.add_argument("--no-2w", action="store_true", help="skip the 2-worker rows")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="connections of the --profile load (16)"
    )
    args = parser.parse_args()
    quick = args.quick
    args.long = args.long or (20_000 if quick else 200_000)
    args.long_seconds = args.long_seconds or (30.0 if quick else 900.0)
    args.seconds = args.seconds or (2.0 if quick else 6.0)
    if args.quiet_seconds is None:
        args.quiet_seconds = 2.0 if quick else 15.0
    args.stats_requests = 500 if quick else 3000
    args.with_litellm = not args.no_litellm and (args.litellm or not quick)
    args.with_2w = not args.no_2w and not quick
    return args


def cpu_plan(no_pin: bool) -> tuple[str | None, str | None]:
    """(gateway cpus, everything else's cpus): the last core to the gateway, if 2+ cores."""
    if no_pin or procs.CPU_COUNT < 2 or not shutil.which("taskset"):
        return None, None
    last = procs.CPU_COUNT - 1
    rest = "0" if last == 1 else f"0-{last - 1}"
    return str(last), rest


def versions() -> dict[str, str]:
    def out(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except OSError:
            return "missing"
        text = (done.stdout + done.stderr).strip()
        return text.splitlines()[0] if text else ""

    return {
        "gateway_commit": out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "gateway_dirty": str(bool(out(["git", "-C", str(ROOT), "status", "--porcelain"]))),
        "python": platform.python_version(),
        "redis": out(["redis-server", "--version"]),
        "nginx": out(["nginx", "-v"]),
        "wrk": out(["wrk", "--version"]),
        "kernel": platform.release(),
        "cpus": str(procs.CPU_COUNT),
    }


def check_tools() -> None:
    missing = [tool for tool in ("wrk", "redis-server", "nginx", "redis-cli") if not _has(tool)]
    if missing:
        packages = {"wrk": "wrk", "redis-server": "redis-server", "redis-cli": "redis-tools"}
        names = " ".join(sorted({packages.get(t, t) for t in missing}))
        sys.exit(f"missing: {', '.join(missing)}; install with: apt-get install -y {names}")


def _has(tool: str) -> bool:
    return shutil.which(tool) is not None or Path(f"/usr/sbin/{tool}").exists()


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    check_tools()
    signal.signal(signal.SIGTERM, _terminate)
    # A shell starts background jobs with SIGINT ignored; SIGINT must stop a run all the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    run = procs.Processes(workdir)
    started = time.monotonic()
    ok = False
    try:
        phases = Phases(args, run, cpu_plan(args.no_pin))
        if args.profile:
            profile(phases)
        else:
            results = phases.all()
            results["meta"] |= {"versions": versions(), "seconds": time.monotonic() - started}
            publish(results, commit_copies=not args.quick)
        ok = True
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything")
    finally:
        run.stop_all()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs of the servers kept in {workdir}")
    print(f"done in {time.monotonic() - started:.0f} s")
    if not ok:
        sys.exit(1)


def publish(results: dict[str, Any], commit_copies: bool) -> None:
    print(report.table(results))
    print(report.one_core_table(results))
    print(report.redis_table(results["redis"]))
    print(report.memory_table(results["memory"]))
    print(report.targets(results))
    for path in report.write(results, commit_copies):
        print(f"wrote {path.relative_to(ROOT)}")


def profile(phases: Phases) -> None:
    summary = phases.profile()
    text = profiling.render(summary)
    print(text)
    report.RESULTS.mkdir(exist_ok=True)
    (report.RESULTS / "profile.txt").write_text(text + "\n")
    (report.RESULTS / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("wrote bench/results/profile.txt, profile.json and profile-raw.txt")


if __name__ == "__main__":
    main()
