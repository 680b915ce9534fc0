"""The per-case loop: what each yielded case carries, in store and source geometry."""

from __future__ import annotations

import numpy as np
import pytest

from kitsprep.cases import find_cases, read_volume
from kitsprep.geometry import voxel_spacing
from kitsprep.store import SliceReader, open_store
from kitstrain.infer.cases import (
    source_predictions,
    source_slices,
    store_predictions,
    store_spacing,
)
from kitstrain.infer.engine import predict_store_case, predict_volume, store_box
from kitstrain.infer.inference import Inference
from tests.kitstrain.infer.test_engine import (
    COHORT,
    CPU,
    LABELLED,
    SIZE,
    WINDOW,
    ThresholdModel,
    cohort,  # noqa: F401  (fixture)
)

THRESHOLD = Inference([ThresholdModel()], 1, CPU, batch_size=3)


def test_store_cases_are_cropped_to_the_stored_image(cohort) -> None:  # noqa: F811
    _, store = cohort
    info = open_store(store)
    done: list[int] = []
    cases = list(store_predictions(THRESHOLD, info, LABELLED, progress=done.append))
    assert [c.case_id for c in cases] == LABELLED
    assert sum(done) == sum(info.cases[c].slices for c in LABELLED)
    sm = SliceReader(store, info.size)
    try:
        for c in cases:
            rows, cols = store_box(info, c.case_id)
            full = predict_store_case(
                Inference([ThresholdModel()], 1, CPU, amp=True), sm, info, c.case_id
            )
            np.testing.assert_array_equal(c.pred, full[:, rows, cols])
            assert c.truth.shape == c.pred.shape and c.truth.dtype == np.uint8
            assert c.spacing == store_spacing(info, c.case_id) and c.axes == (0, 1, 2)
            assert c.imaging is None and c.slice_name == "stored slice"
        assert cases[1].pred.shape[1:] == (19, 32)  # case_00001: 24x40 -> 19x32 + padding
    finally:
        sm.close()


def test_store_cases_refuse_an_unlabelled_case_before_any_inference(cohort) -> None:  # noqa: F811
    from kitsprep.errors import KitsError

    _, store = cohort
    done: list[int] = []
    cases = store_predictions(
        THRESHOLD, open_store(store), ["case_00000", "case_00003"], progress=done.append
    )
    with pytest.raises(KitsError, match="case_00003 is unlabelled"):
        next(cases)
    assert done == []


def test_source_cases_carry_their_truth_spacing_and_file(cohort) -> None:  # noqa: F811
    src, _ = cohort
    refs = find_cases(src)
    done: list[int] = []
    seen = []
    for c in source_predictions(THRESHOLD, refs, WINDOW, SIZE, progress=done.append):
        vol = read_volume(src / c.case_id / "imaging.nii.gz")
        expected = predict_volume(
            Inference([ThresholdModel()], 1, CPU, amp=False), vol, WINDOW, SIZE
        )
        np.testing.assert_array_equal(c.pred, expected)
        labelled = COHORT[c.case_id][2]
        assert (c.truth is not None) == labelled
        if labelled:
            seg = read_volume(src / c.case_id / "segmentation.nii.gz")
            np.testing.assert_array_equal(c.truth, seg.data)
        assert c.spacing == voxel_spacing(vol.header.affine)
        assert c.imaging == src / c.case_id / "imaging.nii.gz"
        assert c.axes == ((2, 0, 1) if COHORT[c.case_id][3] else (0, 1, 2))  # slices last
        # axial slice k for display: HU clipped to the window, in the axial layout
        k = 1
        shown = c.slice_image(k)
        assert shown.shape == c.pred.transpose(c.axes)[k].shape
        assert shown.min() >= WINDOW.lo and shown.max() <= WINDOW.hi
        seen.append(c.case_id)
    assert seen == list(COHORT)
    assert sum(done) == source_slices(refs) == sum(v[0][0] for v in COHORT.values())
