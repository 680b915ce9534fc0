"""Per-case predictions: the one loop over cases behind validation, `score` and `predict`.

`store_predictions` walks cases of the slice store (store geometry, cropped to the resized
image), `source_predictions` walks NIfTI cases (source geometry, their own voxel grid). Both
yield a `CasePrediction` per case: labels, the truth when there is one, the voxel spacing
that surface Dice needs and what an overlay shows. Scoring, writing files and drawing stay
with the caller, so the loop exists once.

Items are yielded one at a time and nothing is kept: a caller that drops each item before
asking for the next holds one case in memory (a source CT is hundreds of MB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kitsprep.cases import CaseRef, Volume, check_pair, read_header, read_volume
from kitsprep.geometry import axial_axes, voxel_spacing
from kitsprep.store import SliceReader, StoreInfo
from kitsprep.window import Window
from kitstrain.infer.engine import (
    SliceProgress,
    Spacing,
    read_store_labels,
    require_scorable,
    store_box,
    store_spacing,  # also this module's: where a CasePrediction's spacing comes from
)
from kitstrain.infer.inference import Inference
from kitstrain.metrics import CaseScore, score_case

__all__ = [
    "CasePrediction",
    "display_slice",
    "source_predictions",
    "source_slices",
    "score_store_cases",
    "store_predictions",
    "store_spacing",
]


@dataclass(frozen=True)
class CasePrediction:
    """One predicted case. `pred` and `truth` share a shape: the stored image inside
    `store_box` (store geometry) or the NIfTI voxel grid in its own axis order (source
    geometry). `axes` puts their axial axis first; `slice_image(k)` is axial slice k of the
    image for display, in `display_range` units (normalised in the store, HU at source)."""

    case_id: str
    pred: np.ndarray  # uint8 labels
    truth: np.ndarray | None  # None: a source case without segmentation
    spacing: Spacing  # mm per axis of `pred`
    axes: tuple[int, int, int]
    slice_image: Callable[[int], np.ndarray]
    display_range: tuple[float, float]
    slice_name: str  # "stored slice" or "slice": how an overlay title names slice k
    imaging: Path | None = None  # the source NIfTI (header of a written prediction)


# --------------------------------------------------------------------------- store geometry


def _stored_slice(
    reader: SliceReader, info: StoreInfo, case_id: str
) -> Callable[[int], np.ndarray]:
    rows, cols = store_box(info, case_id)
    case_rows = info.rows(case_id)
    return lambda k: reader.image(case_rows[k])[rows, cols]


def store_predictions(
    inference: Inference,
    info: StoreInfo,
    cases: Sequence[str],
    *,
    reader: SliceReader | None = None,
    progress: SliceProgress | None = None,
) -> Iterator[CasePrediction]:
    """Labelled store cases with their stored labels, inside `store_box` (the padding around
    a resized case is no voxel of it). Every case is checked before any inference, so a bad
    one fails at once rather than after hours. `reader` may be None to open one here."""
    for case_id in cases:
        require_scorable(info, case_id)
    own = reader is None
    sm = SliceReader(info.path, info.size, info.case_ids, identity=info.identity) if own else reader
    w = info.window
    try:
        for case_id in cases:
            pred = inference.store_case(sm, info, case_id, progress)
            rows, cols = store_box(info, case_id)
            yield CasePrediction(
                case_id=case_id,
                pred=pred[:, rows, cols],
                truth=read_store_labels(sm, info, case_id)[:, rows, cols],
                spacing=store_spacing(info, case_id),
                axes=(0, 1, 2),
                slice_image=_stored_slice(sm, info, case_id),
                display_range=(w.normalise(w.lo), w.normalise(w.hi)),
                slice_name="stored slice",
            )
    finally:
        if own:
            sm.close()


# --------------------------------------------------------------------------- source geometry


def source_slices(refs: Sequence[CaseRef]) -> int:
    """Axial slices of all `refs`, from their headers alone: a progress bar's total."""
    total = 0
    for ref in refs:
        hdr = read_header(ref.imaging, ref.case_id)
        total += hdr.shape[axial_axes(hdr.affine)[0]]
    return total


def display_slice(
    volume: Volume, axes: tuple[int, int, int], index: int, window: Window
) -> np.ndarray:
    """One axial slice of the raw volume in HU, clipped to the window, for display."""
    raw = np.asarray(volume.data.transpose(axes)[index], np.float32)
    hu = raw * np.float32(volume.header.slope) + np.float32(volume.header.inter)
    return np.clip(hu, window.lo, window.hi)


def source_predictions(
    inference: Inference,
    refs: Sequence[CaseRef],
    window: Window,
    size: int,
    *,
    progress: SliceProgress | None = None,
    target_spacing: float | None = None,
) -> Iterator[CasePrediction]:
    """NIfTI cases predicted in their own geometry (`engine.predict_volume`, with the store's
    `window`, slice `size` and target spacing), each with its segmentation when it has one,
    and the spacing from the segmentation's header (the evaluator's)."""
    for ref in refs:
        vol = read_volume(ref.imaging, ref.case_id)
        seg = None
        if ref.segmentation is not None:
            seg = read_volume(ref.segmentation, ref.case_id)
            check_pair(ref.case_id, vol.header, seg.header)
        pred = inference.volume(vol, window, size, ref.case_id, progress, target_spacing)
        axes = axial_axes(vol.header.affine)
        yield CasePrediction(
            case_id=ref.case_id,
            pred=pred,
            truth=None if seg is None else seg.data,
            spacing=voxel_spacing((vol if seg is None else seg).header.affine),
            axes=axes,
            slice_image=lambda k, vol=vol, axes=axes: display_slice(vol, axes, k, window),
            display_range=(window.lo, window.hi),
            slice_name="slice",
            imaging=ref.imaging,
        )
        del vol, seg, pred


def score_store_cases(
    inference: Inference,
    info: StoreInfo,
    cases: Sequence[str],
    *,
    reader: SliceReader | None = None,
    progress: SliceProgress | None = None,
    on_case: Callable[[CaseScore], object] | None = None,
) -> list[CaseScore]:
    """Per-case 3D Dice of every region of the store's label set, in store geometry, inside
    `store_box` (validation): the cases of `store_predictions`, scored without
    spacing (no surface Dice), so `fit` logs what `kitstrain score` computes. `on_case`
    hears each case's score as it is done (a progress line)."""
    scores = []
    for case in store_predictions(inference, info, cases, reader=reader, progress=progress):
        scores.append(score_case(case.case_id, case.pred, case.truth, info.labels))
        if on_case is not None:
            on_case(scores[-1])
    return scores
