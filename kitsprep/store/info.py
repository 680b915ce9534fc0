"""Opening a store: its attributes, case metadata and index as one `StoreInfo`, with a
one-line reason when the file is not a complete store; and the summary `kitsprep info`
shows."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from kitsprep.errors import KitsError
from kitsprep.labels import LabelSet
from kitsprep.spacing import NO_SPACING, Spacing
from kitsprep.store.format import (
    ATTRS_CHECKSUM,
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    SPLITS,
    CaseMeta,
    attrs_checksum,
)
from kitsprep.store.integrity import index_problems
from kitsprep.store.superblock import HDF5_SIGNATURE, read_superblock
from kitsprep.window import Window


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
    spacing: Spacing = NO_SPACING  # --spacing, and the target it resolved to
    # the file opened (device, inode, size, mtime): a reader that finds another file at the
    # path names the store as replaced, not damaged
    identity: tuple[int, ...] = ()
    problems: tuple[str, ...] = ()  # found by the open's checks (`open_store(check=False)`)
    # the folds the source recorded (a MONAI datalist's), in nnU-Net's splits_final.json
    # form over store case ids; None when it recorded none
    splits: list[dict] | None = None

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
        if self.spacing.mm is not None:  # stores of other spacings hold other pixels
            h.update(f":spacing {self.spacing.mm!r}".encode())
        for cid, meta in self.cases.items():
            h.update(f"{cid}:{json.dumps(meta.fingerprint, sort_keys=True)}".encode())
        return h.hexdigest()[:16]


def _unreadable(path: Path, exc: Exception) -> KitsError:
    """The one-line reason a store cannot be opened: truncated, damaged, or not HDF5."""
    size = path.stat().st_size
    sb = read_superblock(path)
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


def file_identity(path: Path | str) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_store(path: Path | str, check: bool = True) -> StoreInfo:
    """Read attributes, case metadata and the index; refuse anything that is not a complete
    store of a format version this code understands, and name a damaged one as such
    (HDF5 reports a torn header or metadata checksum as OSError or KeyError), including
    what the cheap whole-store checks find (`integrity`). `check=False` keeps those in
    `problems` instead (`kitsprep verify` lists them)."""
    path = Path(path)
    if not path.is_file():
        raise KitsError(
            f"store {path} does not exist; build one with `kitsprep build --src DIR --out FILE.h5`"
        )
    try:
        info = _read_store(path)
    except KitsError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise _unreadable(path, exc) from None
    if check and info.problems:
        more = f" (and {len(info.problems) - 1} more)" if len(info.problems) > 1 else ""
        raise KitsError(
            f"{path} is damaged: {info.problems[0]}{more}; run `kitsprep verify {path}`, "
            "then rebuild it with `kitsprep build --overwrite`"
        )
    return info


def _read_store(path: Path) -> StoreInfo:
    identity = file_identity(path)
    with h5py.File(path, "r") as f:
        a = f.attrs
        if a.get("format") != FORMAT:
            raise KitsError(
                f"{path} is an HDF5 file but not a kits slice store (format "
                f"{a.get('format')!r}, expected {FORMAT!r}); build one with "
                "`kitsprep build`"
            )
        version = int(a["format_version"])
        if version not in READABLE_VERSIONS:
            raise KitsError(
                f"{path} has store format version {version}; this kits reads versions "
                f"{READABLE_VERSIONS[0]} to {FORMAT_VERSION} (which carry the KiTS edition's "
                "label set). Rebuild it: `kitsprep build --src DIR --out "
                f"{path.name} --overwrite`"
            )
        if not bool(a.get("complete", False)):
            raise KitsError(
                f"{path} is an unfinished build; finish it with `kitsprep build ... --resume`"
            )
        problems = []
        if ATTRS_CHECKSUM in a and str(a[ATTRS_CHECKSUM]) != attrs_checksum(a):
            problems.append("its root attributes fail their checksum (changed after the build)")
        cases = {
            cid: CaseMeta.from_attrs(cid, f["cases"][cid].attrs) for cid in json.loads(a["cases"])
        }
        index = f["index"][...]
        problems += index_problems(
            index,
            [(c, m.row_start, m.slices, m.labelled) for c, m in cases.items()],
            int(a["size"]),
            identity[2],
        )
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
            index=index,
            edition_reason=str(a.get("edition_reason", "")),
            spacing=Spacing(
                str(a.get("spacing", "none")),
                float(a["target_spacing"]) if "target_spacing" in a else None,
            ),
            identity=identity,
            problems=tuple(problems),
            splits=json.loads(a[SPLITS]) if SPLITS in a else None,
        )


def shrunk_cases(metas: Iterable[CaseMeta]) -> dict[str, float]:
    """Cases resized beyond the target spacing so that their body and labels fit the
    square, with the factor (`geometry.InPlane.shrink`)."""
    return {m.case_id: m.in_plane.shrink for m in metas if m.in_plane.shrink < 1}


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
        "spacing": info.spacing.option,
        "target_spacing": info.spacing.mm,
        "shrunk": shrunk_cases(info.cases.values()),
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
        "folds": len(info.splits) if info.splits is not None else 0,
        "build": info.build,
        "per_case": {
            cid: {
                "slices": m.slices,
                "labelled": m.labelled,
                **({"unlabelled_reason": m.unlabelled_reason} if not m.labelled else {}),
                "source_shape": list(m.source_shape),
                "spacing": list(m.spacing),
                "in_plane": m.in_plane.as_dict(),
            }
            for cid, m in info.cases.items()
        },
    }
