"""Reading slices for training and inference: positioned reads of the chunks at the
offsets the index records, without h5py (`SliceReader`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

# zlib-ng inflates a mostly-zero label slice ~5x faster than ISA-L (long runs of one byte
# are where ISA-L's inflate is slowest); ISA-L still writes them, so stored bytes do not change
from zlib_ng import zlib_ng as _inflater

from kitsprep.errors import KitsError
from kitsprep.store.format import CRC_ON_READ, crc32_bytes

_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024)


class SliceReader:
    """A store's slices by index row, read without h5py and without mapping anything: one
    positioned read (`os.preadv`) per run of adjacent chunks, straight into the caller's
    buffer (a DataLoader worker's batch slot). No page of the file is mapped into
    the process, so a worker's resident memory stays flat however large the store is, and
    a read costs no page faults (the issue-13 measurement: ~1.3x map + copy + MADV_DONTNEED
    per slice). Open one per process (DataLoader worker) after fork/spawn; it pickles as
    its path.

    Every whole image read (`images`) is checked against the index's CRC-32 when ISA-L is
    installed (a dependency): ~10 us per 512x512 slice; zlib's CRC costs ~12x that, so
    without ISA-L `kitsprep verify` is the check (`CRC_ON_READ`). Partial reads
    (`image_rows`, training) are checked once per chunk: see there. A damaged chunk is a
    one-line KitsError naming store, case, slice."""

    def __init__(
        self,
        path: Path | str,
        size: int,
        case_ids: Sequence[str] = (),
        check_crc: bool | None = None,
        identity: tuple[int, ...] = (),
    ):
        self.path = Path(path)
        self.size = size
        self.case_ids = tuple(case_ids)
        self.check_crc = CRC_ON_READ if check_crc is None else bool(check_crc)
        self.identity = tuple(identity)  # the file its index came from (`StoreInfo.identity`)
        self._slice_bytes = size * size * 2
        self._checked: set[int] = set()  # image offsets of the chunks read whole and checked
        self._fd = os.open(self.path, os.O_RDONLY)
        if self.identity and self._replaced():
            os.close(self._fd)
            self._fd = -1
            raise self._replaced_error()

    def image(self, row: np.void | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(size, size) float16 copy of one slice (into `out` if given)."""
        if out is None:
            out = np.empty((self.size, self.size), np.float16)
        self.images(np.atleast_1d(row), out.reshape(1, self.size, self.size))
        return out

    def images(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Slices of `rows` into `out` (len(rows), size, size) float16, C-contiguous. Chunks
        that lie back to back in the file (a 2.5D context stack usually does) come in
        one system call."""
        self._check_out(rows, out)
        # plain ints and memoryview slices: at 5 small chunks per item, numpy scalars and
        # per-chunk array views would cost more than the reads
        offsets = rows["image_offset"].tolist()
        n, sb = len(offsets), self._slice_bytes
        flat = memoryview(out.reshape(-1).view(np.uint8))
        i = 0
        while i < n:
            j = i + 1
            while j < n and j - i < _IOV_MAX and offsets[j] == offsets[j - 1] + sb:
                j += 1
            got = os.preadv(
                self._fd, [flat[k * sb : (k + 1) * sb] for k in range(i, j)], offsets[i]
            )
            if got != (j - i) * sb:
                self.damaged(
                    rows[i],
                    f"the image chunk ends early ({got} of {(j - i) * sb} "
                    "bytes: the file is truncated)",
                )
            i = j
        if self.check_crc:
            crc = crc32_bytes
            for k, want in enumerate(rows["image_crc"].tolist()):
                if crc(flat[k * sb : (k + 1) * sb]) != want:
                    self.damaged(rows[k], "its image chunk fails its CRC-32")
        return out

    def image_rows(
        self, rows: np.ndarray, out: np.ndarray, start: int, stop: int, whole: np.ndarray
    ) -> np.ndarray:
        """Rows `start:stop` of the slices of `rows` into the same rows of `out` (as for
        `images`): what a training sample's warp can reach, one contiguous byte range per
        chunk instead of the whole chunk.

        A part of a chunk cannot be checked against the chunk's CRC-32, so a chunk this
        reader has not read whole yet, or one that `whole` (bool per row) asks for, is read
        whole and checked as `images` does; later partial reads of it trust the bytes that
        passed. So a damaged chunk is reported on a worker's first touch of it, and a
        chunk damaged after that touch is `kitsprep verify`'s to find. Returns the mask of
        the chunks read whole (all their rows in `out` are fresh)."""
        self._check_out(rows, out)
        offsets = rows["image_offset"].tolist()
        fresh = np.array([o not in self._checked for o in offsets]) | whole
        sb, rb = self._slice_bytes, 2 * self.size
        flat = memoryview(out.reshape(-1).view(np.uint8))
        for k, off in enumerate(offsets):
            if fresh[k]:
                self.images(rows[k : k + 1], out[k : k + 1])
                self._checked.add(off)
                continue
            want = (stop - start) * rb
            at = k * sb + start * rb
            got = os.preadv(self._fd, [flat[at : at + want]], off + start * rb)
            if got != want:
                self.damaged(
                    rows[k],
                    f"the image chunk ends early ({got} of {want} bytes: the file is truncated)",
                )
        return fresh

    def _check_out(self, rows: np.ndarray, out: np.ndarray) -> None:
        if out.shape != (len(rows), self.size, self.size) or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be C-contiguous {(len(rows), self.size, self.size)}, found {out.shape}"
            )

    def label(self, row: np.void | np.ndarray) -> np.ndarray:
        """(size, size) uint8, inflated from the deflated chunk."""
        off, n = int(row["label_offset"]), int(row["label_nbytes"])
        if off < 0:
            raise KitsError("this slice belongs to an unlabelled case; it has no label")
        try:
            lab = np.frombuffer(_inflater.decompress(os.pread(self._fd, n, off)), np.uint8)
        except _inflater.error as exc:
            self.damaged(row, f"its label chunk does not inflate ({exc})")
        if lab.size != self.size * self.size:
            self.damaged(
                row, f"its label chunk holds {lab.size} bytes, expected {self.size * self.size}"
            )
        return lab.reshape(self.size, self.size)

    def _replaced(self) -> bool:
        """The file at the path is not the one the index was read from (rebuilt with
        --overwrite, copied over): its reads would not match the index."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self.identity

    def _replaced_error(self) -> KitsError:
        return KitsError(
            f"{self.path} was replaced while in use (the file at that path changed since it "
            "was opened: rebuilt with --overwrite or copied over?); rerun the command "
            "(`kitstrain fit --resume` continues a run) once the new store is complete"
        )

    def damaged(self, row: np.void, what: str) -> NoReturn:
        """Raise the one-line error for a damaged slice `row` (`what` says how it is
        damaged): names store, case and slice, and the fix."""
        if self.identity and self._replaced():
            raise self._replaced_error()
        pos = int(row["case"])
        case = self.case_ids[pos] if pos < len(self.case_ids) else f"case #{pos}"
        raise KitsError(
            f"{self.path}: {case} slice {int(row['slice'])}: {what}; the store "
            f"is damaged, run `kitsprep verify {self.path}`, then rebuild that "
            "case (or the store) from its source"
        )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)

    def __getstate__(self) -> dict:
        # Pickle the path, not the descriptor: each worker opens the file itself.
        return {
            "path": self.path,
            "size": self.size,
            "case_ids": self.case_ids,
            "check_crc": self.check_crc,
            "identity": self.identity,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
