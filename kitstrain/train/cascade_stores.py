"""The cascade's two training stores, derived once from the run's store before either
stage trains: the coarse stage's (every slice of every labelled case shrunk by the coarse
factor, `data.downsample`) and the fine stage's (each case's kidney region: the slices
its foreground spans plus the margin, cut around the region to one square side shared by
all cases, then shrunk by the fine factor: 2 on 512² stores by default). Both are
ordinary stores in RUN/stores/, so each stage is an ordinary `fit`, validated on what it
trains on (the fine stage inside the true regions, as the brief of issue 19 allows).

Downsampling once beats downsampling on read: each coarse slice is read many times (2.5D
context, epochs), and the coarse store holds 1/factor² of the source's bytes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kitsprep.errors import KitsError
from kitsprep.files import atomic_path
from kitsprep.geometry import InPlane
from kitsprep.store import SliceReader, StoreInfo, open_store
from kitsprep.store.format import CasePlan, CaseWritten, compress_label_slice, crc32
from kitsprep.store.write import create_layout, finalize
from kitstrain.data.downsample import downsample_images, downsample_labels
from kitstrain.infer.engine import store_spacing
from kitstrain.infer.regions import Box, fit_box, grow_box

__all__ = ["StageStores", "case_region", "derive_stage_stores"]

STORES = "stores"  # RUN/stores/: coarse.h5 and fine.h5


@dataclass(frozen=True)
class StageStores:
    coarse: Path
    fine: Path
    fine_side: int  # the fine store's square side: the largest region, fitted, shrunk


def case_region(info: StoreInfo, reader: SliceReader, case_id: str, margin_mm: float) -> Box:
    """The box around all of a labelled case's foreground in store geometry, grown by the
    margin; the whole case where it holds no foreground (the fine stage then sees it
    whole, as inference's fallback does)."""
    rows = info.rows(case_id)
    shape = (len(rows), info.size, info.size)
    fg = np.flatnonzero(info.foreground_pixels(rows))
    if fg.size == 0:
        return Box(0, shape[0], 0, info.size, 0, info.size)
    ys, xs = np.zeros(info.size, bool), np.zeros(info.size, bool)
    for k in fg:
        lab = reader.label(rows[k]) > 0
        ys |= lab.any(1)
        xs |= lab.any(0)
    y, x = np.flatnonzero(ys), np.flatnonzero(xs)
    box = Box(int(fg[0]), int(fg[-1]) + 1, int(y[0]), int(y[-1]) + 1, int(x[0]), int(x[-1]) + 1)
    return grow_box(box, store_spacing(info, case_id), margin_mm, shape)


def _write_store(
    path: Path,
    info: StoreInfo,
    size: int,
    cases: dict[str, tuple[int, InPlane]],
    read: Callable[[str], tuple[np.ndarray, np.ndarray]],
    build: dict,
) -> None:
    """A complete store at `path` (atomically): `cases` maps each case to its slice count
    and in-plane record; `read(case)` gives its (images, labels) at `size`."""
    with atomic_path(path) as tmp:
        plans = [CasePlan(c, n, True) for c, (n, _) in cases.items()]
        offsets = create_layout(tmp, plans, size, info.window, build)
        written = []
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for case_id, (n, in_plane) in cases.items():
                images, labels = read(case_id)
                for k in range(n):
                    os.pwrite(
                        fd, np.ascontiguousarray(images[k]).view(np.uint8), int(offsets[case_id][k])
                    )
                values = info.num_classes
                counts = np.stack([(labels == v).sum((1, 2)) for v in range(1, values)], 1)
                meta = replace(info.cases[case_id], slices=n, row_start=0, in_plane=in_plane)
                written.append(
                    CaseWritten(
                        meta=meta,
                        counts=counts.astype(np.int64),
                        label_chunks=[compress_label_slice(lab) for lab in labels],
                        max_label=int(labels.max(initial=0)),
                        image_crc=np.array([crc32(img) for img in images], np.uint32),
                    )
                )
        finally:
            os.close(fd)
        finalize(tmp, written, {}, info.labels, info.edition_reason)


def derive_stage_stores(
    info: StoreInfo,
    run_dir: Path,
    factor: int,
    margin_mm: float,
    divisor: int,
    fine_factor: int = 1,
) -> StageStores:
    """RUN/stores/coarse.h5 and fine.h5 from the labelled cases of `info`; stores already
    there (a resumed run) are kept. `divisor` is the fine network's 2**depth; the fine
    regions are cut at the store's side, their sides multiples of fine_factor * divisor,
    then shrunk by `fine_factor`."""
    folder = run_dir / STORES
    folder.mkdir(parents=True, exist_ok=True)
    coarse, fine = folder / "coarse.h5", folder / "fine.h5"
    cases = info.labelled_cases
    build = {"derived_from": str(info.path), "fingerprint": info.fingerprint}
    reader = SliceReader(info.path, info.size, info.case_ids, identity=info.identity)
    try:

        def whole(case_id: str) -> tuple[np.ndarray, np.ndarray]:
            rows = info.rows(case_id)
            images = np.empty((len(rows), info.size, info.size), np.float16)
            reader.images(rows, images)
            labels = np.stack([reader.label(r) for r in rows])
            return images, labels

        if not coarse.is_file():
            small = info.size // factor

            def shrink(case_id: str) -> tuple[np.ndarray, np.ndarray]:
                images, labels = whole(case_id)
                return downsample_images(images, factor), downsample_labels(labels, factor)

            planes = {}
            for c in cases:
                p = info.cases[c].in_plane
                planes[c] = (
                    info.cases[c].slices,
                    InPlane(p.src_h, p.src_w, max(1, p.new_h // factor), max(1, p.new_w // factor),
                            p.pad_top // factor, p.pad_left // factor, small),
                )  # fmt: skip
            _write_store(coarse, info, small, planes, shrink, {**build, "coarse_factor": factor})
        if fine.is_file():
            built = open_store(fine).build
            if int(built.get("fine_factor", 1)) != fine_factor:
                raise KitsError(
                    f"{fine} was derived at fine factor {built.get('fine_factor', 1)}, not "
                    f"{fine_factor}; resume with the run's own record, or start a new run"
                )
            return StageStores(coarse, fine, int(built["fine_side"]))
        # margins in mm at the store's own spacing, on full-resolution labels
        regions = {c: case_region(info, reader, c, margin_mm) for c in cases}
        widest = max(max(b.y1 - b.y0, b.x1 - b.x0) for b in regions.values())
        unit = divisor * fine_factor
        full = min(info.size, -(-widest // unit) * unit)
        side = full // fine_factor
        shape = (0, info.size, info.size)
        crops = {c: fit_box(b, unit, shape, side=full) for c, b in regions.items()}

        def cut(case_id: str) -> tuple[np.ndarray, np.ndarray]:
            b = crops[case_id]
            rows = info.rows(case_id)[b.z0 : b.z1]
            images = np.empty((len(rows), info.size, info.size), np.float16)
            reader.images(rows, images)
            labels = np.stack([reader.label(r) for r in rows])
            images = images[:, b.y0 : b.y1, b.x0 : b.x1]
            labels = np.ascontiguousarray(labels[:, b.y0 : b.y1, b.x0 : b.x1])
            # Labels max-pooled, as the coarse stage's: at factor 2 that grows a structure
            # by half a store pixel per side on average (one at most: ~0.8 mm at 512²,
            # within the annotations' own boundary noise), while nearest sampling would
            # shift every boundary by as much toward one corner (the area-averaged image's
            # pixel centre is its block's centre, a sampled label's is not) and drop three
            # in four one-pixel tumours, the structures the fine stage exists for.
            return downsample_images(images, fine_factor), downsample_labels(labels, fine_factor)

        planes = {
            c: (b.z1 - b.z0, InPlane(side, side, side, side, 0, 0, side)) for c, b in crops.items()
        }
        regions_json = {c: list(b) for c, b in crops.items()}
        _write_store(
            fine, info, side, planes, cut,
            {**build, "fine_side": side, "fine_factor": fine_factor, "region_side": full,
             "margin_mm": margin_mm, "regions": regions_json},
        )  # fmt: skip
        return StageStores(coarse, fine, side)
    finally:
        reader.close()
