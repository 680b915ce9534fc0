"""Worker processes that die with their parent: a build's decode workers and the training
loader's workers call `die_with_parent()` first, so a `kill -9` of the main process
leaves no orphan holding memory, files or the store (Linux: PR_SET_PDEATHSIG; the
kernel sends SIGKILL when the parent exits)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits. `parent`: the pid the
    caller expects as parent (default: the current one); if the parent is already gone
    (this process was re-parented before the call), exit now. False where the platform has
    no such call (nothing done)."""
    expected = os.getppid() if parent is None else parent
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != expected:  # the parent died before the call: nobody will signal us
        os._exit(1)
    return True
