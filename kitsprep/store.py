"""The slice store's format, in one place: both packages read and write it through here.

Layout (format `kits-slices`, version 2):

    /                 attrs: format, format_version, kitsprep_version, window (JSON),
                             size, edition, edition_reason, labels (the edition's LabelSet,
                             JSON), num_classes,
                             image_dtype, build (JSON), cases (JSON list), bad_cases (JSON),
                             complete
    /cases/<case_id>/image   (slices, size, size) float16, one uncompressed slice per chunk,
                             allocated at creation so chunk offsets never move
    /cases/<case_id>/label   (slices, size, size) uint8, one deflated slice per chunk
                             (absent for unlabelled cases)
        attrs: labelled, unlabelled_reason (why a case has no labels, e.g. no mask file),
               slices, row_start, source_shape, spacing, affine, axcodes, axes,
               in_plane (JSON), fingerprint (JSON), source dtypes
    /index            one row per slice (`index_dtype`): what samplers and `info` read;
                      `counts[v]` is the slice's pixel count of label value v.

Image chunks are raw float16 at recorded byte offsets, so the training loader reads them
with positioned reads (`SliceReader`, `os.preadv`) without h5py. Label chunks are zlib
streams (HDF5's deflate filter) at recorded offsets and lengths, read the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import h5py
import numpy as np

# zlib-ng inflates a mostly-zero label slice ~5x faster than ISA-L (long runs of one byte
# are where ISA-L's inflate is slowest); ISA-L still writes them, so stored bytes do not change
from zlib_ng import zlib_ng as _inflater

from kitsprep import __version__
from kitsprep.errors import KitsError
from kitsprep.geometry import InPlane
from kitsprep.labels import LabelSet
from kitsprep.window import Window

try:
    from isal import isal_zlib as _zlib

    CRC_ON_READ = True  # ISA-L's CRC-32 is cheap enough to check every read (SliceReader)
except ImportError:
    import zlib as _zlib

    CRC_ON_READ = False

FORMAT = "kits-slices"
FORMAT_VERSION = 2  # 2: the store carries its label set; per-label counts in the index
LABEL_LEVEL = 1  # deflate level for label chunks: mostly zeros, level 1 is already tiny


def index_dtype(num_classes: int) -> np.dtype:
    """One row per slice; ``counts`` has one entry per label value 0..num_classes-1."""
    return np.dtype(
        [
            ("case", "<i4"),  # position in the root `cases` list
            ("slice", "<i4"),  # slice number within the case (axial, as stored)
            ("counts", "<i4", (num_classes,)),  # pixels per label value (0 = background)
            ("image_offset", "<i8"),  # byte offset of the slice's float16 chunk in the file
            ("label_offset", "<i8"),  # byte offset of the deflated label chunk; -1 if unlabelled
            ("label_nbytes", "<i4"),  # its length in bytes; 0 if unlabelled
            ("image_crc", "<u4"),  # CRC-32 of the slice's float16 bytes: verify sees bit rot
        ]
    )


@dataclass(frozen=True)
class CasePlan:
    """What the layout needs before any voxel is decoded (headers only)."""

    case_id: str
    slices: int
    labelled: bool


@dataclass(frozen=True)
class CaseMeta:
    """Per-case attributes: everything needed to map a prediction back to the source."""

    case_id: str
    labelled: bool
    slices: int
    row_start: int
    source_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    axcodes: str
    axes: tuple[int, int, int]
    in_plane: InPlane
    fingerprint: dict
    unlabelled_reason: str = ""  # why an unlabelled case has no labels

    def attrs(self) -> dict:
        return {
            "labelled": self.labelled,
            "unlabelled_reason": self.unlabelled_reason,
            "slices": self.slices,
            "row_start": self.row_start,
            "source_shape": np.asarray(self.source_shape, np.int64),
            "spacing": np.asarray(self.spacing, np.float64),
            "affine": np.asarray(self.affine, np.float64),
            "axcodes": self.axcodes,
            "axes": np.asarray(self.axes, np.int64),
            "in_plane": json.dumps(self.in_plane.as_dict()),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }

    @classmethod
    def from_attrs(cls, case_id: str, a: h5py.AttributeManager) -> CaseMeta:
        return cls(
            case_id=case_id,
            labelled=bool(a["labelled"]),
            slices=int(a["slices"]),
            row_start=int(a["row_start"]),
            source_shape=tuple(int(v) for v in a["source_shape"]),
            spacing=tuple(float(v) for v in a["spacing"]),
            affine=np.asarray(a["affine"], np.float64),
            axcodes=str(a["axcodes"]),
            axes=tuple(int(v) for v in a["axes"]),
            in_plane=InPlane(**json.loads(a["in_plane"])),
            fingerprint=json.loads(a["fingerprint"]),
            unlabelled_reason=str(a.get("unlabelled_reason", "")),
        )


@dataclass(frozen=True)
class StoreInfo:
    """Root attributes plus per-case metadata and the index: all a reader needs."""

    path: Path
    format_version: int
    kitsprep_version: str
    window: Window
    size: int
    labels: LabelSet
    build: dict
    bad_cases: dict
    cases: dict[str, CaseMeta]
    index: np.ndarray
    edition_reason: str = ""  # why the build chose the edition (e.g. "kits23.json in SRC")

    @property
    def num_classes(self) -> int:
        return self.labels.num_classes

    def label_pixels(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Per-row pixel counts of the label called ``name`` (all rows by default)."""
        rows = self.index if rows is None else rows
        return rows["counts"][:, self.labels.value(name)]

    def foreground_pixels(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Per-row pixel counts of every foreground label together."""
        rows = self.index if rows is None else rows
        return rows["counts"][:, 1:].sum(1)

    @property
    def case_ids(self) -> list[str]:
        return list(self.cases)

    @property
    def labelled_cases(self) -> list[str]:
        return [c for c, m in self.cases.items() if m.labelled]

    def rows(self, case_id: str) -> np.ndarray:
        """Index rows of one case, in slice order."""
        m = self.cases[case_id]
        return self.index[m.row_start : m.row_start + m.slices]

    @property
    def fingerprint(self) -> str:
        """Identifies the store's content: format, parameters and every source fingerprint."""
        import hashlib

        h = hashlib.sha256()
        h.update(f"{FORMAT}:{self.format_version}:{self.window.to_json()}:{self.size}".encode())
        for cid, meta in self.cases.items():
            h.update(f"{cid}:{json.dumps(meta.fingerprint, sort_keys=True)}".encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------- writing


def create_layout(
    path: Path, plans: list[CasePlan], size: int, window: Window, build: dict
) -> dict[str, np.ndarray]:
    """Create every dataset before any voxel is written, allocating image chunks up front.
    Returns each case's image-chunk byte offsets. After this the file's metadata does not
    change until `finalize`, so raw writes at those offsets (from any process) cannot
    corrupt it, whatever kills the build."""
    offsets: dict[str, np.ndarray] = {}
    with h5py.File(path, "w", libver=("v110", "latest"), track_order=True) as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["kitsprep_version"] = __version__
        f.attrs["window"] = window.to_json()
        f.attrs["size"] = size
        f.attrs["image_dtype"] = "float16"
        f.attrs["build"] = json.dumps(build, sort_keys=True)
        f.attrs["cases"] = json.dumps([p.case_id for p in plans])
        f.attrs["complete"] = False
        grp = f.create_group("cases", track_order=True)
        for p in plans:
            g = grp.create_group(p.case_id)
            shape = (p.slices, size, size)
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_chunk((1, size, size))
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            space = h5py.h5s.create_simple(shape)
            dsid = h5py.h5d.create(g.id, b"image", h5py.h5t.IEEE_F16LE, space, dcpl=dcpl)
            offsets[p.case_id] = np.array(
                [dsid.get_chunk_info(i).byte_offset for i in range(p.slices)], np.int64
            )
            if p.labelled:
                g.create_dataset(
                    "label",
                    shape=shape,
                    dtype=np.uint8,
                    chunks=(1, size, size),
                    compression="gzip",
                    compression_opts=LABEL_LEVEL,
                )
    return offsets


def image_offsets(path: Path) -> dict[str, np.ndarray]:
    """Image-chunk offsets of an existing layout (for a resumed build)."""
    with h5py.File(path, "r") as f:
        return {
            cid: np.array(
                [g["image"].id.get_chunk_info(i).byte_offset for i in range(g["image"].shape[0])],
                np.int64,
            )
            for cid, g in f["cases"].items()
        }


def compress_label_slice(labels: np.ndarray) -> bytes:
    """One label slice as the deflate filter stores it (a zlib stream)."""
    return _zlib.compress(np.ascontiguousarray(labels).tobytes(), LABEL_LEVEL)


@dataclass
class CaseWritten:
    """What a finished case hands the finaliser: metadata, per-slice counts, label chunks."""

    meta: CaseMeta
    counts: np.ndarray  # (slices, 3) int64: pixels of label values 1, 2, 3
    label_chunks: list[bytes] | None
    max_label: int
    image_crc: np.ndarray  # (slices,) uint32: crc32 of each stored image slice


def crc32(buf: np.ndarray) -> int:
    """CRC-32 of an array's bytes (ISA-L's, several times zlib's speed)."""
    return _zlib.crc32(np.ascontiguousarray(buf).view(np.uint8))


def finalize(
    path: Path,
    written: list[CaseWritten],
    bad_cases: dict[str, str],
    labels: LabelSet,
    edition_reason: str = "",
) -> None:
    """Write labels, per-case attributes and the index, then mark the file complete."""
    rows = []
    dtype = index_dtype(labels.num_classes)
    with h5py.File(path, "r+") as f:
        order = json.loads(f.attrs["cases"])
        by_id = {w.meta.case_id: w for w in written}
        for cid in list(order):
            if cid not in by_id and cid in f["cases"]:
                del f["cases"][cid]  # a bad case skipped mid-build; its space stays unused
        order = [cid for cid in order if cid in by_id]
        row = 0
        for pos, cid in enumerate(order):
            w = by_id[cid]
            g = f["cases"][cid]
            meta = CaseMeta(**{**w.meta.__dict__, "row_start": row})
            for k, v in meta.attrs().items():
                g.attrs[k] = v
            img = g["image"]
            r = np.zeros(meta.slices, dtype)
            r["case"] = pos
            r["slice"] = np.arange(meta.slices)
            if meta.labelled:  # the build refused values outside `labels`
                fg = w.counts[:, : labels.num_classes - 1]
                r["counts"][:, 1:] = fg
                r["counts"][:, 0] = img.shape[1] * img.shape[2] - fg.sum(1)
            r["image_offset"] = [img.id.get_chunk_info(i).byte_offset for i in range(meta.slices)]
            r["label_offset"] = -1
            r["image_crc"] = w.image_crc
            if meta.labelled:
                lab = g["label"]
                for i, chunk in enumerate(w.label_chunks):
                    lab.id.write_direct_chunk((i, 0, 0), chunk)
                f.flush()
                for i in range(meta.slices):
                    info = lab.id.get_chunk_info(i)
                    r["label_offset"][i] = info.byte_offset
                    r["label_nbytes"][i] = info.size
            rows.append(r)
            row += meta.slices
        index = np.concatenate(rows) if rows else np.zeros(0, dtype)
        if "index" in f:  # left by a run killed after this point: finalize again, same result
            del f["index"]
        f.create_dataset("index", data=index)
        f.attrs["cases"] = json.dumps(order)
        f.attrs["edition"] = labels.edition
        f.attrs["edition_reason"] = edition_reason
        f.attrs["labels"] = labels.to_json()
        f.attrs["num_classes"] = labels.num_classes
        f.attrs["bad_cases"] = json.dumps(bad_cases, sort_keys=True)
        f.attrs["complete"] = True


# --------------------------------------------------------------------------- reading


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _superblock(path: Path) -> tuple[bytearray, int] | None:
    """The raw v2/v3 superblock (what `create_layout` writes) and its length without the
    checksum; None for anything else."""
    with open(path, "rb") as f:
        raw = bytearray(f.read(64))
    if len(raw) < 12 or raw[:8] != HDF5_SIGNATURE or raw[8] not in (2, 3):
        return None
    body = 12 + 4 * raw[9]  # base, extension, end-of-file and root addresses
    return (raw, body) if len(raw) >= body + 4 else None


def _lookup3(data: bytes) -> int:
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
    sb = _superblock(path)
    if sb is None or sb[0][11] == 0:
        return False
    raw, body = sb
    raw[11] = 0
    raw[body : body + 4] = _lookup3(bytes(raw[:body])).to_bytes(4, "little")
    with open(path, "r+b") as f:
        f.write(raw[: body + 4])
        f.flush()
        os.fsync(f.fileno())
    return True


def _unreadable(path: Path, exc: Exception) -> KitsError:
    """The one-line reason a store cannot be opened: truncated, damaged, or not HDF5."""
    size = path.stat().st_size
    sb = _superblock(path)
    with open(path, "rb") as f:
        is_hdf5 = f.read(8) == HDF5_SIGNATURE
    if sb is not None:
        raw, _ = sb
        width = raw[9]
        eof = int.from_bytes(raw[12 + 2 * width : 12 + 3 * width], "little")
        if size < eof:
            return KitsError(
                f"{path} is truncated: it holds {size} bytes but its header "
                f"says {eof} (an interrupted copy or download?); copy it again "
                "or rebuild it with `kitsprep build --overwrite`"
            )
    if is_hdf5:
        reason = str(exc.args[0] if exc.args else exc).splitlines()[0][:160]
        return KitsError(
            f"{path} is damaged ({reason}); rebuild it "
            "with `kitsprep build --overwrite`, or copy it again"
        )
    return KitsError(f"{path} is not an HDF5 file; expected a store written by `kitsprep build`")


def open_store(path: Path | str) -> StoreInfo:
    """Read attributes, case metadata and the index; refuse anything that is not a complete
    store of a format version this code understands, and name a damaged one as such
    (HDF5 reports a torn header or metadata checksum as OSError or KeyError)."""
    path = Path(path)
    if not path.is_file():
        raise KitsError(
            f"store {path} does not exist; build one with `kitsprep build --src DIR --out FILE.h5`"
        )
    try:
        return _read_store(path)
    except KitsError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise _unreadable(path, exc) from None


def _read_store(path: Path) -> StoreInfo:
    with h5py.File(path, "r") as f:
        a = f.attrs
        if a.get("format") != FORMAT:
            raise KitsError(
                f"{path} is an HDF5 file but not a kits slice store (format "
                f"{a.get('format')!r}, expected {FORMAT!r}); build one with "
                "`kitsprep build`"
            )
        version = int(a["format_version"])
        if version != FORMAT_VERSION:
            raise KitsError(
                f"{path} has store format version {version}; this kits reads "
                f"version {FORMAT_VERSION} (which carries the KiTS edition's label "
                "set). Rebuild it: `kitsprep build --src DIR --out "
                f"{path.name} --overwrite`"
            )
        if not bool(a.get("complete", False)):
            raise KitsError(
                f"{path} is an unfinished build; finish it with `kitsprep build ... --resume`"
            )
        cases = {
            cid: CaseMeta.from_attrs(cid, f["cases"][cid].attrs) for cid in json.loads(a["cases"])
        }
        return StoreInfo(
            path=path,
            format_version=version,
            kitsprep_version=str(a["kitsprep_version"]),
            window=Window.from_json(a["window"]),
            size=int(a["size"]),
            labels=LabelSet.from_json(a["labels"]),
            build=json.loads(a["build"]),
            bad_cases=json.loads(a.get("bad_cases", "{}")),
            cases=cases,
            index=f["index"][...],
            edition_reason=str(a.get("edition_reason", "")),
        )


_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024)


class SliceReader:
    """A store's slices by index row, read without h5py and without mapping anything: one
    positioned read (`os.preadv`) per run of adjacent chunks, straight into the caller's
    buffer (a DataLoader worker's batch slot). No page of the file is mapped into
    the process, so a worker's resident memory stays flat however large the store is, and
    a read costs no page faults (the issue-13 measurement: ~1.3x map + copy + MADV_DONTNEED
    per slice). Open one per process (DataLoader worker) after fork/spawn; it pickles as
    its path.

    Every image read is checked against the index's CRC-32 when ISA-L is installed (a
    dependency): ~10 us per 512x512 slice, about 1 % of a loader worker's time per slice;
    zlib's CRC costs ~12x that, so without ISA-L `kitsprep verify` is the check
    (`CRC_ON_READ`). A damaged chunk is a one-line KitsError naming store, case, slice."""

    def __init__(
        self,
        path: Path | str,
        size: int,
        case_ids: Sequence[str] = (),
        check_crc: bool | None = None,
    ):
        self.path = Path(path)
        self.size = size
        self.case_ids = tuple(case_ids)
        self.check_crc = CRC_ON_READ if check_crc is None else bool(check_crc)
        self._slice_bytes = size * size * 2
        self._fd = os.open(self.path, os.O_RDONLY)

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
        if out.shape != (len(rows), self.size, self.size) or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be C-contiguous {(len(rows), self.size, self.size)}, found {out.shape}"
            )
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
                self._damaged(
                    rows[i],
                    f"the image chunk ends early ({got} of {(j - i) * sb} "
                    "bytes: the file is truncated)",
                )
            i = j
        if self.check_crc:
            crc = _zlib.crc32
            for k, want in enumerate(rows["image_crc"].tolist()):
                if crc(flat[k * sb : (k + 1) * sb]) != want:
                    self._damaged(rows[k], "its image chunk fails its CRC-32")
        return out

    def label(self, row: np.void | np.ndarray) -> np.ndarray:
        """(size, size) uint8, inflated from the deflated chunk."""
        off, n = int(row["label_offset"]), int(row["label_nbytes"])
        if off < 0:
            raise KitsError("this slice belongs to an unlabelled case; it has no label")
        try:
            lab = np.frombuffer(_inflater.decompress(os.pread(self._fd, n, off)), np.uint8)
        except _inflater.error as exc:
            self._damaged(row, f"its label chunk does not inflate ({exc})")
        if lab.size != self.size * self.size:
            self._damaged(
                row, f"its label chunk holds {lab.size} bytes, expected {self.size * self.size}"
            )
        return lab.reshape(self.size, self.size)

    def _damaged(self, row: np.void, what: str) -> NoReturn:
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
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def file_size(path: Path) -> int:
    return os.stat(path).st_size


def summarise(info: StoreInfo) -> dict:
    """What `kitsprep info` shows; reads the index only."""
    idx = info.index
    labelled = (
        np.array([info.cases[info.case_ids[c]].labelled for c in idx["case"]], bool)
        if len(idx)
        else np.zeros(0, bool)
    )
    lab = idx[labelled]
    pixels = max(1, len(lab) * info.size * info.size)
    fg = info.foreground_pixels(lab) > 0
    why_unlabelled: dict[str, int] = {}
    for m in info.cases.values():
        if not m.labelled:
            why = m.unlabelled_reason or "reason not recorded"
            why_unlabelled[why] = why_unlabelled.get(why, 0) + 1
    return {
        "path": str(info.path),
        "format_version": info.format_version,
        "kitsprep_version": info.kitsprep_version,
        "cases": len(info.cases),
        "labelled_cases": len(info.labelled_cases),
        "unlabelled_cases": len(info.cases) - len(info.labelled_cases),
        "unlabelled_reasons": why_unlabelled,
        "slices": int(len(idx)),
        "size": info.size,
        "num_classes": info.num_classes,
        "edition": info.labels.edition,
        "edition_reason": info.edition_reason,
        "labels": dict(info.labels.labels),
        "bytes": file_size(info.path),
        "window": json.loads(info.window.to_json()),
        "fg_slice_share": float(fg.mean()) if len(lab) else 0.0,
        "pixel_share": {
            name: float(info.label_pixels(name, lab).sum() / pixels) for name in info.labels.names
        },
        "bad_cases": info.bad_cases,
        "build": info.build,
        "per_case": {
            cid: {
                "slices": m.slices,
                "labelled": m.labelled,
                **({"unlabelled_reason": m.unlabelled_reason} if not m.labelled else {}),
                "source_shape": list(m.source_shape),
                "spacing": list(m.spacing),
            }
            for cid, m in info.cases.items()
        },
    }
