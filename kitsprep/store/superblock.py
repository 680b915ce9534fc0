"""The HDF5 superblock, read and repaired by hand: a build killed with the store open
for writing leaves flags that make HDF5 refuse the file (`clear_write_flags` clears
them for --resume), and its end-of-file address tells a truncated store from a damaged
one (`kitsprep.store.info`)."""

from __future__ import annotations

import os
from pathlib import Path

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def read_superblock(path: Path) -> tuple[bytearray, int] | None:
    """The raw v2/v3 superblock (what `create_layout` writes) and its length without the
    checksum; None for anything else."""
    with open(path, "rb") as f:
        raw = bytearray(f.read(64))
    if len(raw) < 12 or raw[:8] != HDF5_SIGNATURE or raw[8] not in (2, 3):
        return None
    body = 12 + 4 * raw[9]  # base, extension, end-of-file and root addresses
    return (raw, body) if len(raw) >= body + 4 else None


def lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 `hashlittle` (initval 0): HDF5's metadata checksum."""
    m = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & m

    def word(i: int) -> int:
        return int.from_bytes(data[i : i + 4], "little")

    a = b = c = (0xDEADBEEF + len(data)) & m
    i = 0
    while len(data) - i > 12:
        a, b, c = (a + word(i)) & m, (b + word(i + 4)) & m, (c + word(i + 8)) & m
        for x, y, z, k in (
            (0, 2, 1, 4),
            (1, 0, 2, 6),
            (2, 1, 0, 8),
            (0, 2, 1, 16),
            (1, 0, 2, 19),
            (2, 1, 0, 4),
        ):  # mix(a, b, c)
            v = [a, b, c]
            v[x] = ((v[x] - v[y]) & m) ^ rot(v[y], k)
            v[y] = (v[y] + v[z]) & m
            a, b, c = v
        i += 12
    if i == len(data):
        return c
    tail = bytes(data[i:]) + bytes(12 - (len(data) - i))
    a = (a + int.from_bytes(tail[0:4], "little")) & m
    b = (b + int.from_bytes(tail[4:8], "little")) & m
    c = (c + int.from_bytes(tail[8:12], "little")) & m
    for x, y, k in (
        (2, 1, 14),
        (0, 2, 11),
        (1, 0, 25),
        (2, 1, 16),
        (0, 2, 4),
        (1, 0, 14),
        (2, 1, 24),
    ):  # final(a, b, c)
        v = [a, b, c]
        v[x] = (v[x] ^ v[y]) - rot(v[y], k) & m
        a, b, c = v
    return c


def clear_write_flags(path: Path) -> bool:
    """What `h5clear -s` does: a process killed with the file open for writing leaves the
    superblock's "open for write" flags set, and HDF5 then refuses to open it at all. The
    build's data is intact (its commit records say which cases are), so the flags are
    cleared and the superblock checksum redone. True when there was something to clear."""
    sb = read_superblock(path)
    if sb is None or sb[0][11] == 0:
        return False
    raw, body = sb
    raw[11] = 0
    raw[body : body + 4] = lookup3(bytes(raw[:body])).to_bytes(4, "little")
    with open(path, "r+b") as f:
        f.write(raw[: body + 4])
        f.flush()
        os.fsync(f.fileno())
    return True
