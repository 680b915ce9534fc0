"""The build lock: one build of OUT at a time."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from kitsprep.errors import KitsError


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """One build of OUT at a time: a second one is told the first is running, instead of
    being sent to --resume a build that is still going. flock, so a killed build's lock
    is free at once."""
    path = out.with_name(out.name + ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise KitsError(
            f"cannot write next to --out {out} ({exc.strerror}); choose an --out "
            "in a writable folder"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise KitsError(
                f"a build of {out} is running (process {pid}); wait for it to "
                "finish, or stop it and rerun with --resume"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)
