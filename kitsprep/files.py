"""The one way kits writes a file that something else may read: to a temporary name beside
it, then renamed over it, so a reader or a crash sees the old file or the new one, never
half of one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from kitsprep import failpoints
from kitsprep.errors import KitsError

TEMP_SUFFIX = ".tmp"  # `atomic_path`'s temporary names: .<name>.<pid>.tmp


def fsync_path(path: Path | str) -> None:
    """Flush a file's (or a directory's entries') data to the disk: a rename is durable only
    once its directory is synced."""
    failpoints.hit(f"fsync {Path(path).name}")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_folder(out: Path | str, option: str) -> None:
    """Refuse, before any work, an output whose nearest existing folder cannot hold it: a
    file where a folder should be, or a folder this user cannot write."""
    for parent in Path(out).resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                raise KitsError(
                    f"{option} {out}: {parent} is a file, not a folder; choose another {option}"
                )
            if not os.access(parent, os.W_OK):
                raise KitsError(
                    f"{option} {out}: {parent} is not writable; choose another {option}"
                )
            return


@contextlib.contextmanager
def atomic_path(path: Path | str, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` for any writer that takes a path (h5py,
    nibabel, torch.save, savefig); on success rename it over `path`. On failure remove it and
    name `path` in the OSError (a full disk says which file). `fsync` makes the new file and
    the rename durable before returning (checkpoints, manifests a resume trusts)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        yield tmp
        failpoints.hit(f"write {path.name}")
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
        failpoints.hit(f"rename {path.name}")
        if fsync:
            fsync_path(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


@contextlib.contextmanager
def write_errors(path: Path | str, fix: str) -> Iterator[None]:
    """Around the writing of `path`: an OSError, or a library's RuntimeError around one
    (torch's "file write failed"), becomes one line: the file, the reason, the free space
    left there, and `fix`."""
    path = Path(path)
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
    except RuntimeError as exc:
        text = str(exc).lower()
        if not any(w in text for w in ("write", "file", "space", "i/o")):
            raise
        reason = str(exc).strip().splitlines()[0][:120]
    else:
        return
    try:
        st = os.statvfs(path.parent)
        state = f"{st.f_bavail * st.f_frsize / 2**20:.0f} MB free there"
    except OSError:
        state = "its folder is unreadable"
    raise KitsError(
        f"cannot write {path} ({reason}; {state}): the disk is full, over a size limit or "
        f"failing; {fix}"
    ) from None


def write_atomic(path: Path | str, data: str | bytes, *, fsync: bool = False) -> Path:
    """Write text or bytes to `path` atomically (see `atomic_path`); returns the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
    return Path(path)


def remove_stale_temps(folder: Path | str) -> list[Path]:
    """Delete the temporary files (`.<name>.<pid>.tmp`) that killed writers left in `folder`
    (not this process's own). Call it holding the folder's lock, when a run or build starts
    or resumes: nobody else can be writing them then. Returns what it removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    mine = f".{os.getpid()}{TEMP_SUFFIX}"
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and not p.name.endswith(mine):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
