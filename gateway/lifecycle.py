"""Processes that must not outlive the gateway: the embedded store and uvicorn workers."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

_PR_SET_PDEATHSIG = 1
try:
    # Loaded once here: `die_with_parent` also runs between fork and exec (preexec_fn),
    # where loading a library could deadlock on a lock another thread held at the fork.
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None  # not Linux


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel send SIGTERM to this process when its parent dies (Linux only).

    Without it, a gateway killed with SIGKILL leaves its store and workers running,
    holding the data directory and the port. If `parent` (its pid) is already gone by the
    time this runs, no signal would ever come, so this process ends itself now.
    """
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def worker_parent() -> int | None:
    """The supervisor's pid in a worker uvicorn spawned (--workers > 1), else None."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None else None
