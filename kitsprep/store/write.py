"""Writing a store: the layout first (every chunk allocated before any voxel is decoded),
then, once every case is in, the labels, attributes and index (`finalize`)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from kitsprep import __version__, failpoints
from kitsprep.labels import LabelSet
from kitsprep.spacing import NO_SPACING, Spacing
from kitsprep.store.format import (
    ATTRS_CHECKSUM,
    FORMAT,
    FORMAT_VERSION,
    LABEL_LEVEL,
    SPLITS,
    CaseMeta,
    CasePlan,
    CaseWritten,
    attrs_checksum,
    index_dtype,
)
from kitsprep.window import Window


def create_layout(
    path: Path,
    plans: list[CasePlan],
    size: int,
    window: Window,
    build: dict,
    spacing: Spacing = NO_SPACING,
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
        f.attrs["spacing"] = spacing.option
        if spacing.mm is not None:
            f.attrs["target_spacing"] = spacing.mm
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


def index_nbytes(labels: LabelSet, slices: int) -> int:
    """Bytes of the index of a store of `slices` slices."""
    return index_dtype(labels.num_classes).itemsize * slices


def finalize(
    path: Path,
    written: list[CaseWritten],
    bad_cases: dict[str, str],
    labels: LabelSet,
    edition_reason: str = "",
    splits: list[dict] | None = None,
) -> None:
    """Write labels, per-case attributes and the index, then mark the file complete.
    ``splits``: the folds the source recorded (nnU-Net's splits_final.json form), kept as
    the ``splits`` attribute for `kitstrain fit --fold`."""
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
            failpoints.hit(f"h5 case {cid}")
        index = np.concatenate(rows) if rows else np.zeros(0, dtype)
        if "index" in f:  # left by a run killed after this point: finalize again, same result
            del f["index"]
        f.create_dataset("index", data=index)
        failpoints.hit("h5 index")
        f.attrs["cases"] = json.dumps(order)
        f.attrs["edition"] = labels.edition
        f.attrs["edition_reason"] = edition_reason
        f.attrs["labels"] = labels.to_json()
        f.attrs["num_classes"] = labels.num_classes
        f.attrs["bad_cases"] = json.dumps(bad_cases, sort_keys=True)
        if splits is not None:
            f.attrs[SPLITS] = json.dumps(splits)
        f.attrs["complete"] = True
        f.attrs[ATTRS_CHECKSUM] = attrs_checksum(f.attrs)
        failpoints.hit("h5 attributes")
