"""The processes a run needs, all on 127.0.0.1, each in its own process group.

Every process is started with `die_with_parent`, so even a harness killed with SIGKILL
takes them down, and `Processes.stop_all` ends each group (SIGTERM, then SIGKILL) on
any exit: normal end, error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.lifecycle import die_with_parent

CPU_COUNT = os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not up yet: refused, reset, half-started
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    """`command` run under `taskset -c cpus` when pinning is asked for and possible."""
    if not cpus or not shutil.which("taskset"):
        return list(command)
    return ["taskset", "-c", cpus, *command]


def _child_setup() -> None:
    die_with_parent()


class Processes:
    """The processes of one run, stopped together, newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
        log.close()
        self.started.append((name, process))
        return process

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        self.started = [(n, p) for n, p in self.started if p is not process]
        _end_group(process)

    def stop_pid(self, pid: int) -> None:
        for _, process in self.started:
            if process.pid == pid:
                self.stop(process)
                return

    def stop_all(self) -> None:
        while self.started:
            _, process = self.started.pop()
            _end_group(process)


def _end_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    # Workers or helpers of the group may outlive their leader; none may outlive the run.
    _signal_group(process, signal.SIGKILL)
    if process.poll() is None:
        process.wait(5)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(c) for c in task.read_text().split()]
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _busy_seconds() -> float:
    """CPU time all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        for member in [pid, *children(pid)]:
            with contextlib.suppress(OSError):  # ended meanwhile
                total += cpu_seconds(member)
    return total


class CpuMeter:
    """CPU the run's own processes used during a measurement, and what others used.

    The machine is shared (tests of other work may run on it): `other_cores` is the busy
    time of every process outside this run, in cores, so a disturbed row can be told.
    """

    def __init__(self, servers: list[int], focus: list[int]) -> None:
        self.servers, self.focus = servers, focus

    def __enter__(self) -> CpuMeter:
        self.started = time.monotonic()
        self.busy = _busy_seconds()
        self.ours = _tree_cpu(self.servers) + _own_cpu()
        self.focused = _tree_cpu(self.focus)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.started
        self.focus_seconds = _tree_cpu(self.focus) - self.focused
        ours = _tree_cpu(self.servers) + _own_cpu() - self.ours
        self.other_cores = max(0.0, (_busy_seconds() - self.busy - ours) / self.wall)


def _own_cpu() -> float:
    """This process and its waited-for children (wrk, the stream client)."""
    me, waited = os.times()[:2], os.times()[2:4]
    return sum(me) + sum(waited)


def busy_cores(window: float = 0.5) -> float:
    """Cores busy over the next `window` seconds, all processes together."""
    before = _busy_seconds()
    time.sleep(window)
    return (_busy_seconds() - before) / window


def wait_for_quiet(limit: float, threshold: float = 0.3) -> float:
    """Wait (up to `limit` s) until the machine is nearly idle; returns the seconds waited.

    Called between rows, when the run's own servers are idle, so what is busy is others'.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit and busy_cores() > threshold:
        pass
    return time.monotonic() - started
