"""Locks that the kernel releases when their process dies and that a child never inherits:
POSIX record locks (`fcntl.lockf`), taken atomically on a lock file holding the owner's
pid. One build of an OUT at a time (`kitsprep.build.lock`), one process per run directory
(`kitstrain.core.rundir`).

flock locks belong to the open file, which forked workers share: a killed build's
orphaned workers kept its lock. A record lock belongs to the process alone. Record locks
do not exclude the process that holds them, so this process's own locks are kept here
and a second take of the same file is refused as well."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

__all__ = ["LockBusy", "release", "take"]

_held: dict[Path, int] = {}  # lock file -> descriptor, this process's


class LockBusy(Exception):
    """The lock is held by another process (`pid`, as it wrote it; '?' if unknown)."""

    def __init__(self, path: Path, pid: str) -> None:
        super().__init__(f"{path} is held by process {pid}")
        self.path, self.pid = path, pid


def take(path: Path | str) -> None:
    """Hold the lock at `path` (created if missing) for this process, or raise `LockBusy`.
    A lock file unlinked by its last holder while this one waited is not the lock any more:
    taken again on the file that is there now."""
    path = Path(path).absolute()
    if path in _held:
        raise LockBusy(path, str(os.getpid()))
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = "?"
            with contextlib.suppress(OSError):
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise LockBusy(path, pid) from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released and unlinked between our open and our lock
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held[path] = fd
        return


def release(path: Path | str) -> bool:
    """Unlink and release the lock at `path` if this process holds it; True if it did."""
    path = Path(path).absolute()
    fd = _held.pop(path, None)
    if fd is None:
        return False
    with contextlib.suppress(OSError):
        os.unlink(path)  # while still held: a waiter that opened it retries on a new file
    os.close(fd)  # releases the record lock
    return True


def holds(path: Path | str) -> bool:
    return Path(path).absolute() in _held
