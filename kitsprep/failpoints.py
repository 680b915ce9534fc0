"""Named failpoints at every point where kits writes, renames or fsyncs something another
run will read, for the crash tests (`tests/crash.py`): they kill the process at the Nth
point, then check that `--resume` gives the uninterrupted result.

Off unless armed, and then a test's doing: `hit` is one global lookup and a return. Armed
by `arm(...)` in the process itself (a forked child of the crash sweep), or by the
environment for a subprocess:

    KITS_FAILPOINT=N            SIGKILL this process at its Nth point (1-based)
    KITS_FAILPOINT_LOG=PATH     append each point's name to PATH, one a line

Points sit beside the I/O call, never in the training step: a checkpoint, a metrics line,
a commit record, a rename, an fsync.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["arm", "disarm", "hit"]

_lock = threading.Lock()
_kill_at: int | None = None
_log: str | None = None
_count = 0
_armed = False


def arm(kill_at: int | None = None, log: str | None = None) -> None:
    """Count points from 0 again; kill at the `kill_at`th, and/or log their names."""
    global _kill_at, _log, _count, _armed
    _kill_at, _log, _count = kill_at, log, 0
    _armed = kill_at is not None or log is not None


def disarm() -> None:
    arm(None, None)


def hit(name: str) -> None:
    """A named write/rename/fsync point. Armed: log it, and die here when it is the one."""
    if not _armed:
        return
    global _count
    with _lock:
        _count += 1
        if _log is not None:
            with open(_log, "a") as f:
                f.write(f"{name}\n")
        if _kill_at is not None and _count >= _kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _from_environment() -> None:
    at = os.environ.get("KITS_FAILPOINT")
    log = os.environ.get("KITS_FAILPOINT_LOG")
    if at or log:
        arm(int(at) if at else None, log or None)


_from_environment()
