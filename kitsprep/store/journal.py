"""The undo journal of a store's final write. `finalize` rewrites HDF5 metadata all over
the file (attributes, the chunk indexes, the new index dataset), and a kill or a full disk
in the middle leaves a file HDF5 cannot open. Before it starts, every byte of the file
except the image chunks it never touches (the committed cases' slices, gigabytes) is saved
to the journal, with the file's length, fsynced and renamed into place; a resumed build
first puts those bytes back and cuts the file to that length, so the store is exactly as
it was before its final write, and `finalize` runs again on it. A torn store is redone,
never read."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import struct
import zlib
from pathlib import Path

import numpy as np

from kitsprep import failpoints
from kitsprep.errors import KitsError
from kitsprep.files import atomic_path

__all__ = ["reserve", "restore_journal", "save_journal", "unreserve"]

_MAGIC = b"KITSJRN1"


def _gaps(size: int, kept: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges of [0, size) outside the `kept` ranges."""
    out, pos = [], 0
    for start, end in sorted(kept):
        if start > pos:
            out.append((pos, min(start, size)))
        pos = max(pos, end)
    if pos < size:
        out.append((pos, size))
    return [(a, b) for a, b in out if b > a]


def save_journal(store: Path, journal: Path, chunks: list[np.ndarray], chunk_bytes: int) -> int:
    """Save the bytes of `store` outside the chunks at offsets `chunks` (each `chunk_bytes`
    long) to `journal`, durably. Returns the journal's size in bytes."""
    size = store.stat().st_size
    starts = np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, np.int64)
    kept: list[tuple[int, int]] = []
    for s in starts.tolist():  # merge adjacent chunks: few ranges
        if kept and kept[-1][1] == s:
            kept[-1] = (kept[-1][0], s + chunk_bytes)
        else:
            kept.append((s, s + chunk_bytes))
    gaps = _gaps(size, kept)
    with open(store, "rb") as f:
        parts = []
        for a, b in gaps:
            f.seek(a)
            parts.append(f.read(b - a))
    body = b"".join(parts)
    head = json.dumps({"size": size, "ranges": gaps}).encode()
    crc = zlib.crc32(body, zlib.crc32(head))
    with atomic_path(journal, fsync=True) as tmp, open(tmp, "wb") as f:
        f.write(_MAGIC + struct.pack("<QI", len(head), crc) + head + body)
    return len(body) + len(head)


def restore_journal(store: Path, journal: Path) -> bool:
    """Put the journal's bytes back into `store` and cut it to its recorded length: the
    store as it was before `finalize` began. False when there is no journal (finalize never
    began). A damaged journal (it was fsynced before use, so only the disk breaks it) is
    one line: the build must start over."""
    if not journal.is_file():
        return False
    raw = journal.read_bytes()
    try:
        if raw[:8] != _MAGIC:
            raise ValueError("not a kits journal")
        n, crc = struct.unpack("<QI", raw[8:20])
        head, body = raw[20 : 20 + n], raw[20 + n :]
        if zlib.crc32(body, zlib.crc32(head)) != crc:
            raise ValueError("checksum mismatch")
        meta = json.loads(head)
    except (ValueError, struct.error) as exc:
        raise KitsError(
            f"the interrupted build's journal {journal} is damaged ({exc}); start over "
            "with --overwrite"
        ) from None
    fd = os.open(store, os.O_RDWR)
    try:
        pos = 0
        for a, b in meta["ranges"]:
            os.pwrite(fd, body[pos : pos + b - a], a)
            pos += b - a
        os.ftruncate(fd, meta["size"])
        failpoints.hit("write restored store")
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


_FALLOC_FL_KEEP_SIZE = 1


def reserve(store: Path, nbytes: int) -> None:
    """Make sure `nbytes` more can be written to `store` before HDF5 writes them: HDF5 on a
    full disk can crash the process (a segmentation fault, not an error). Checks the file
    size limit and the free space, then reserves the blocks past the end of the file
    (fallocate, KEEP_SIZE) where the file system can. Raises OSError (ENOSPC, EFBIG) naming
    the store: the build's one-line disk message."""
    size = store.stat().st_size
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and size + nbytes > soft:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(store))
    st = os.statvfs(store.parent)
    if st.f_bavail * st.f_frsize < nbytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(store))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(store, os.O_RDWR)
    try:
        if fallocate(fd, _FALLOC_FL_KEEP_SIZE, size, nbytes) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OSError(err, os.strerror(err), str(store))
            # EOPNOTSUPP and the like: the checks above are what we have
    finally:
        os.close(fd)


def unreserve(store: Path) -> None:
    """Give back the blocks `reserve` kept past the end of the file that HDF5 did not use."""
    size = store.stat().st_size
    fd = os.open(store, os.O_RDWR)
    try:
        os.ftruncate(fd, size + 1)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
