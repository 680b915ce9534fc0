"""The slice store's format: what every byte means, so writer and readers agree. Both
packages read and write the store through `kitsprep.store`; this module defines it.

Layout (format `kits-slices`, version 3; version 2 stores still read):

    /                 attrs: format, format_version, kitsprep_version, window (JSON),
                             size, spacing (the --spacing option), target_spacing (mm per
                             stored pixel; absent under --spacing none), edition,
                             edition_reason, labels (the edition's LabelSet, JSON),
                             num_classes,
                             image_dtype, build (JSON), cases (JSON list), bad_cases (JSON),
                             complete, attrs_checksum (of all the others); splits (JSON,
                             only when the source recorded folds: nnU-Net splits_final.json
                             form over store case ids)
    /cases/<case_id>/image   (slices, size, size) float16, one uncompressed slice per chunk,
                             allocated at creation so chunk offsets never move
    /cases/<case_id>/label   (slices, size, size) uint8, one deflated slice per chunk
                             (absent for unlabelled cases)
        attrs: labelled, unlabelled_reason (why a case has no labels, e.g. no mask file),
               slices, row_start, source_shape, spacing, affine, axcodes, axes,
               in_plane (JSON: `geometry.InPlane`, crop + resize + pad; version 2
               has no crop fields: the whole slice), fingerprint (JSON), source dtypes
    /index            one row per slice (`index_dtype`): what samplers and `info` read;
                      `counts[v]` is the slice's pixel count of label value v.

Image chunks are raw float16 at recorded byte offsets, so the training loader reads them
with positioned reads (`SliceReader`, `os.preadv`) without h5py. Label chunks are zlib
streams (HDF5's deflate filter) at recorded offsets and lengths, read the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import h5py
import numpy as np

from kitsprep.geometry import InPlane

try:
    from isal import isal_zlib as _zlib

    CRC_ON_READ = True  # ISA-L's CRC-32 is cheap enough to check every read (SliceReader)
except ImportError:
    import zlib as _zlib

    CRC_ON_READ = False

FORMAT = "kits-slices"
# 2: the store carries its label set; per-label counts in the index. 3: a target spacing
# (root `spacing`, `target_spacing`) and a crop in each case's in-plane transform.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # a version 2 store reads as one built with --spacing none
LABEL_LEVEL = 1  # deflate level for label chunks: mostly zeros, level 1 is already tiny


ATTRS_CHECKSUM = "attrs_checksum"
SPLITS = "splits"


def attrs_checksum(attrs) -> str:
    """SHA-256 (hex, 16 digits) of a store's root attributes other than this one, by name:
    a flipped byte in the window, the label set or the case list is seen on open."""
    import hashlib

    def plain(v):
        if isinstance(v, bytes):
            return v.decode(errors="replace")
        if isinstance(v, np.ndarray):
            return v.tolist()
        return v.item() if isinstance(v, np.generic) else v

    items = {k: plain(attrs[k]) for k in sorted(attrs.keys()) if k != ATTRS_CHECKSUM}
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


def compress_label_slice(labels: np.ndarray) -> bytes:
    """One label slice as the deflate filter stores it (a zlib stream)."""
    return _zlib.compress(np.ascontiguousarray(labels).tobytes(), LABEL_LEVEL)


def crc32(buf: np.ndarray) -> int:
    """CRC-32 of an array's bytes (ISA-L's, several times zlib's speed)."""
    return _zlib.crc32(np.ascontiguousarray(buf).view(np.uint8))


# The same CRC-32 of any bytes-like object, as is: the reader checks memoryview slices of its
# read buffer with it, at a cost per call that an array conversion would double.
crc32_bytes = _zlib.crc32


@dataclass
class CaseWritten:
    """What a finished case hands the finaliser: metadata, per-slice counts, label chunks."""

    meta: CaseMeta
    counts: np.ndarray  # (slices, k) int64: pixels of label values 1..k (`label_counts`)
    label_chunks: list[bytes] | None
    max_label: int
    image_crc: np.ndarray  # (slices,) uint32: crc32 of each stored image slice
