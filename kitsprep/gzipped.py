"""gzip streams of NIfTI files: inflated never past what the header says the file holds
(`inflate_bounded`), and fingerprinted from their trailer without inflating
(`gzip_fingerprint`, `source_fingerprint`)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from kitsprep.errors import KitsError

try:
    from isal.isal_zlib import decompressobj as _decompressobj
    from isal.isal_zlib import error as _InflateError  # not a zlib.error nor an OSError
except ImportError:  # isal is a dependency; plain zlib keeps a broken install working
    from zlib import decompressobj as _decompressobj

    _InflateError = zlib.error

__all__ = ["HEADER_BYTES", "gzip_fingerprint", "inflate_bounded", "source_fingerprint"]


def gzip_fingerprint(raw: bytes) -> str:
    """CRC32 and length of the uncompressed content, from the gzip trailer: content-based
    and free, since the decoder verifies it anyway."""
    crc, isize = struct.unpack("<II", raw[-8:])
    return f"gz:{len(raw)}:{crc:08x}:{isize}"


def source_fingerprint(path: Path) -> str:
    """`read_volume`'s fingerprint without inflating: a gzip file's trailer and length (a
    few bytes); an uncompressed file is read whole. `--resume` spots edited sources by it."""
    if path.name.endswith(".gz"):
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 8))
            crc, isize = struct.unpack("<II", f.read(8).rjust(8, b"\0"))
        return f"gz:{size}:{crc:08x}:{isize}"
    blob = path.read_bytes()
    return f"raw:{len(blob)}:{zlib.crc32(blob):08x}"


HEADER_BYTES = 544  # a NIfTI-1 header with its extension flag fits; NIfTI-2's too


def inflate_bounded(blob: bytes, name: str, path: Path) -> bytes:
    """The gzip stream of `blob` inflated up to what its NIfTI header says the file holds
    (vox_offset + shape x itemsize), never further: memory is bounded by the header, not
    by the stream. A stream that holds more or less than that is refused, naming both
    sizes. Inflates the first bytes twice (the header, then everything): negligible."""
    head = zlib.decompressobj(31)
    try:
        # a prefix of the input: with max_length, zlib copies all unused input aside
        first = head.decompress(memoryview(blob)[: 1 << 16], HEADER_BYTES)
        if len(first) < HEADER_BYTES and not head.eof:
            first += head.decompress(
                head.unconsumed_tail + blob[1 << 16 :], HEADER_BYTES - len(first)
            )
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(first))
    except Exception as exc:  # noqa: BLE001 - zlib's, nibabel's: a bad header either way
        raise KitsError(
            f"{name}: {path.name} is truncated or corrupt, or has no valid NIfTI header "
            f"({exc}); re-download the case, or skip it with --skip-bad"
        ) from None
    shape = tuple(int(v) for v in hdr.get_data_shape())
    want = (
        int(hdr.get_data_offset()) + int(np.prod(shape)) * np.dtype(hdr.get_data_dtype()).itemsize
    )
    d = _decompressobj(31)
    more = False
    try:
        data = d.decompress(blob, want)
        while not d.eof and d.unconsumed_tail and not more:
            more = bool(d.decompress(d.unconsumed_tail, 1))  # a byte past the header's size?
        more = more or _more_members(d.unused_data)  # a second member (concatenated gzip)
    except (OSError, EOFError, ValueError, zlib.error, _InflateError) as exc:
        raise KitsError(
            f"{name}: {path.name} is truncated or corrupt ({exc}); "
            "re-download the case, or skip it with --skip-bad"
        ) from None
    if more:
        isize = int.from_bytes(blob[-4:], "little")
        raise KitsError(
            f"{name}: {path.name} inflates to more than the {want} bytes its header "
            f"(shape {shape}) describes (its gzip trailer records {isize} bytes, modulo "
            "4 GiB); the file is damaged or not a plain NIfTI volume "
            "(a decompression bomb?), re-export the scan or skip it with --skip-bad"
        )
    if len(data) < want or not d.eof:
        if d.eof:  # a whole stream, too short for its header
            raise KitsError(
                f"{name}: {path.name} holds fewer voxels than its header's shape {shape} "
                f"says ({len(data)} bytes, expected {want}); the file is truncated, "
                "re-download it"
            )
        raise KitsError(
            f"{name}: {path.name} is truncated or corrupt: its gzip stream is cut short "
            f"before the {want} bytes its header's shape {shape} says; re-download the "
            "case, or skip it with --skip-bad"
        )
    return data


def _more_members(extra: bytes) -> bool:
    """Whether bytes after a gzip member inflate to anything (a second member)."""
    if not extra.strip(b"\0"):
        return False
    try:
        return bool(zlib.decompressobj(31).decompress(extra, 1))
    except zlib.error:
        return False  # trailing garbage that is no gzip member: as gzip tools, ignored
