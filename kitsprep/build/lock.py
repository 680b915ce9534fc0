"""The build lock: one build of OUT at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from kitsprep import locks
from kitsprep.errors import KitsError


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """One build of OUT at a time: a second one is told the first is running, instead of
    being sent to --resume a build that is still going. A POSIX record lock on `OUT.lock`
    (`kitsprep.locks`): the decode workers do not inherit it, and the kernel frees it the
    moment the build dies, so a killed build's lock is never in the way."""
    path = out.with_name(out.name + ".lock")
    try:
        locks.take(path)
    except locks.LockBusy as busy:
        raise KitsError(
            f"a build of {out} is running (process {busy.pid}); wait for it to "
            "finish, or stop it and rerun with --resume"
        ) from None
    except OSError as exc:
        raise KitsError(
            f"cannot write next to --out {out} ({exc.strerror}); choose an --out "
            "in a writable folder"
        ) from None
    try:
        yield
    finally:
        locks.release(path)
