"""`kitsprep verify`: prove a store is whole and, with the source, that its labels are the
source masks through the recorded transform."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from kitsprep.cases import find_cases, read_volume
from kitsprep.geometry import InPlane, restore_labels
from kitsprep.kernels.labels import label_counts, labels_resample
from kitsprep.labels import counted_values
from kitsprep.store.format import crc32
from kitsprep.store.info import StoreInfo, open_store
from kitsprep.store.reader import SliceReader

try:
    from isal.isal_zlib import error as _InflateError
except ImportError:
    from zlib import error as _InflateError


@dataclass
class VerifyReport:
    cases: int = 0
    slices: int = 0
    problems: list[str] = field(default_factory=list)
    checked_src: bool = False

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def verify_store(
    path: Path, src: Path | None = None, on_case: Callable[[str], None] | None = None
) -> VerifyReport:
    """Every case present with its slice count, index rows consistent with the arrays
    (offsets, counts), memory-map reads equal to h5py reads, and with `src` every label
    equal to the source mask resampled as recorded."""
    info = open_store(path, check=False)
    report = VerifyReport(checked_src=src is not None, problems=list(info.problems))
    if info.problems:  # the index cannot be trusted to read the arrays by
        return report
    sources = {c.case_id: c for c in find_cases(src)} if src is not None else {}
    smap = SliceReader(path, info.size, info.case_ids, check_crc=False)  # reported below
    try:
        with h5py.File(path, "r") as f:
            for cid, meta in info.cases.items():
                try:
                    _verify_case(f, info, smap, cid, report)
                    if src is not None:
                        _verify_source(info, cid, sources, report)
                except (OSError, KeyError, ValueError, RuntimeError, _InflateError) as exc:
                    # a damaged chunk fails its filter; torn metadata fails its checksum
                    reason = exc.args[0] if exc.args else exc
                    report.problems.append(f"{cid}: cannot read its data ({reason})")
                report.cases += 1
                report.slices += meta.slices
                if on_case:
                    on_case(cid)
    finally:
        smap.close()
    return report


def _verify_case(
    f: h5py.File, info: StoreInfo, smap: SliceReader, cid: str, report: VerifyReport
) -> None:
    meta = info.cases[cid]
    g = f["cases"].get(cid)
    if g is None:
        report.problems.append(f"{cid}: listed but its group is missing")
        return
    img = g["image"]
    if img.shape != (meta.slices, info.size, info.size):
        report.problems.append(
            f"{cid}: image shape {img.shape}, expected {(meta.slices, info.size, info.size)}"
        )
        return
    rows = info.rows(cid)
    if not np.array_equal(rows["slice"], np.arange(meta.slices)):
        report.problems.append(f"{cid}: index rows are not slices 0..{meta.slices - 1}")
        return
    for i, row in enumerate(rows):
        if img.id.get_chunk_info(i).byte_offset != row["image_offset"]:
            report.problems.append(f"{cid} slice {i}: index image offset is stale")
            return
        mapped = smap.image(row)
        if not np.array_equal(mapped.view(np.uint16), img[i].view(np.uint16)):
            report.problems.append(f"{cid} slice {i}: memory-map read differs from HDF5")
            return
        if crc32(mapped) != row["image_crc"]:
            report.problems.append(
                f"{cid} slice {i}: image bytes fail their checksum (the "
                "file changed after the build)"
            )
            return
        if not np.isfinite(img[i]).all():
            report.problems.append(f"{cid} slice {i}: image holds NaN/Inf")
            return
    if not meta.labelled:
        if "label" in g:
            report.problems.append(f"{cid}: flagged unlabelled but has labels")
        return
    lab = g["label"][...]
    counts = np.stack([(lab == v).sum((1, 2)) for v in range(info.num_classes)], 1)
    if not np.array_equal(counts, rows["counts"]):
        report.problems.append(f"{cid}: index label counts differ from the label array")
    for i, row in enumerate(rows):
        if not np.array_equal(smap.label(row), lab[i]):
            report.problems.append(f"{cid} slice {i}: mapped label chunk differs from HDF5")
            return


def _verify_inverse(
    cid: str, plane: InPlane, labels: np.ndarray, stored: np.ndarray, report: VerifyReport
) -> None:
    """Predictions go back to the source through the recorded transform's inverse: no
    labelled source voxel may lie outside the crop, and where the store did not downsample
    the stored labels mapped back must be the source mask itself."""
    cut = int(np.count_nonzero(labels)) - int(np.count_nonzero(labels[(slice(None), *plane.crop)]))
    if cut:
        report.problems.append(f"{cid}: {cut} labelled source voxels lie outside the recorded crop")
    elif plane.crop_h <= plane.new_h and plane.crop_w <= plane.new_w:
        back = restore_labels(stored, plane)
        if not np.array_equal(back, labels):
            n = int((back != labels).sum())
            report.problems.append(
                f"{cid}: {n} voxels differ from the source mask once the stored labels are "
                "mapped back through the recorded transform"
            )


def _verify_source(info: StoreInfo, cid: str, sources: dict, report: VerifyReport) -> None:
    meta = info.cases[cid]
    ref = sources.get(cid)
    if ref is None:
        report.problems.append(f"{cid}: not found in the source folder")
        return
    vol = read_volume(ref.imaging, cid)
    if vol.fingerprint != meta.fingerprint.get("imaging"):
        report.problems.append(
            f"{cid}: source imaging changed since the build "
            f"({vol.fingerprint} vs {meta.fingerprint.get('imaging')})"
        )
    if not meta.labelled:
        return
    if ref.segmentation is None:
        report.problems.append(f"{cid}: store has labels but the source has no segmentation")
        return
    seg = read_volume(ref.segmentation, cid)
    labels = seg.data.transpose(meta.axes)
    counts = label_counts(labels.shape[0], counted_values(info.labels.labels))
    expected, _ = labels_resample(labels, meta.in_plane, counts)
    with h5py.File(info.path, "r") as f:
        stored = f["cases"][cid]["label"][...]
    if not np.array_equal(expected, stored):
        n = int((expected != stored).sum())
        report.problems.append(f"{cid}: {n} label voxels differ from the source mask")
    _verify_inverse(cid, meta.in_plane, labels, stored, report)
    # Per label of the store's edition: the index the samplers read equals the source.
    index = info.rows(cid)["counts"][:, 1:]
    for name, value in info.labels.labels:
        src_n, idx_n = int(counts[:, value - 1].sum()), int(index[:, value - 1].sum())
        if not np.array_equal(counts[:, value - 1], index[:, value - 1]):
            report.problems.append(
                f"{cid}: index counts of label {value} ({name}) differ from "
                f"the source mask ({idx_n} vs {src_n} pixels)"
            )
    outside = [v + 1 for v in np.flatnonzero(counts.sum(0)) if v + 1 not in info.labels.values]
    if outside:
        report.problems.append(
            f"{cid}: the source mask holds label(s) "
            f"{', '.join(map(str, outside))}, outside {info.labels.edition}"
        )
