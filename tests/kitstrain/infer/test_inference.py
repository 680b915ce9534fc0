"""`Inference`: ensembles average probabilities, one model is today's path, and a
post-processing step sees every case's labels with their spacing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from kitsprep.cases import find_cases, read_volume
from kitsprep.geometry import voxel_spacing
from kitsprep.labels import EDITIONS
from kitsprep.store import SliceReader, open_store
from kitstrain.infer.cases import source_predictions, store_predictions
from kitstrain.infer.engine import (
    NO_FLIPS,
    TTA_FLIPS,
    read_store_images,
    stack_context,
    store_box,
    store_spacing,
)
from kitstrain.infer.inference import Inference, tta_flips
from kitstrain.model.unet import UNet, UNetConfig
from tests.kitstrain.infer.test_engine import (
    COHORT,
    CPU,
    LABELLED,
    SIZE,
    WINDOW,
    ThresholdModel,
    cohort,  # noqa: F401  (fixture)
    threshold_labels,
)

WRITES = tuple(r.writes for r in EDITIONS["kits19"].regions)


def unet(seed: int, regions: bool) -> UNet:
    """A small random U-Net over 2.5D context 1; these seeds give mixed labels on the cohort."""
    torch.manual_seed(seed)
    cfg = UNetConfig(
        in_channels=3,
        num_classes=3,
        width=4,
        depth=2,
        regions=regions,
        region_writes=WRITES if regions else (),
    )
    return UNet(cfg).eval()


def reference_labels(
    models: list[UNet], images: np.ndarray, regions: bool, flips=TTA_FLIPS
) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the mean probability over models and flips, computed directly (float64,
    whole case at once), and where they are decisive: the winning probability clears the
    runner-up (classes) or 0.5 (regions) by more than float32 rounding could move it."""
    x = torch.from_numpy(stack_context(images, 1)).float()
    probs = []
    with torch.no_grad():
        for m in models:
            for dims in flips:
                y = m(torch.flip(x, dims) if dims else x)
                y = (torch.flip(y, dims) if dims else y).double()
                probs.append(torch.sigmoid(y) if regions else torch.softmax(y, dim=1))
    p = torch.stack(probs).mean(0).numpy()
    if regions:
        labels = np.zeros(p[:, 0].shape, np.uint8)
        for k, value in enumerate(WRITES):
            labels[p[:, k] > 0.5] = value
        decisive = (np.abs(p - 0.5) > 1e-5).all(axis=1)
    else:
        labels = p.argmax(axis=1).astype(np.uint8)
        top2 = np.sort(p, axis=1)[:, -2:]
        decisive = top2[:, 1] - top2[:, 0] > 1e-5
    return labels, decisive


@pytest.mark.parametrize("regions", [False, True], ids=["classes", "regions"])
def test_two_identical_models_label_as_one(cohort, regions: bool) -> None:  # noqa: F811
    src, store = cohort
    info = open_store(store)
    model = unet(2, regions)
    one = Inference([model], 1, CPU, batch_size=3)
    two = Inference([model, copy.deepcopy(model)], 1, CPU, batch_size=3)
    assert one.region_writes == two.region_writes == (WRITES if regions else ())
    sm = SliceReader(store, info.size)
    try:
        seen = set()
        for cid in info.case_ids:
            labels = one.store_case(sm, info, cid)
            np.testing.assert_array_equal(two.store_case(sm, info, cid), labels)
            seen |= set(np.unique(labels).tolist())
        assert seen == {0, 1, 2}  # a test with teeth: every label occurs
    finally:
        sm.close()
    # source geometry, including the way back through cropping and bilinear resizing
    # (case_00001 non-square, case_00003 upsampled, case_00004 slices last)
    for cid in COHORT:
        vol = read_volume(src / cid / "imaging.nii.gz")
        np.testing.assert_array_equal(
            two.volume(vol, WINDOW, SIZE, cid), one.volume(vol, WINDOW, SIZE, cid)
        )


@pytest.mark.parametrize(
    "regions, seeds", [(False, (1, 2)), (True, (0, 2))], ids=["classes", "regions"]
)
def test_two_models_label_by_their_mean_probability(cohort, regions: bool, seeds) -> None:  # noqa: F811
    src, store = cohort
    info = open_store(store)
    models = [unet(s, regions) for s in seeds]
    ensemble = Inference(models, 1, CPU, flips=TTA_FLIPS, batch_size=4)
    sm = SliceReader(store, info.size)
    try:
        differs = [0, 0]
        for cid in ("case_00000", "case_00001", "case_00003"):  # square, non-square, upsampled
            images = read_store_images(sm, info, cid)
            labels = ensemble.store_case(sm, info, cid)
            expected, decisive = reference_labels(models, images, regions)
            assert decisive.mean() > 0.95
            np.testing.assert_array_equal(labels[decisive], expected[decisive])
            for k, m in enumerate(models):
                alone = Inference([m], 1, CPU, flips=TTA_FLIPS).store_case(sm, info, cid)
                differs[k] += int((alone != labels).sum())
        assert all(differs)  # the ensemble is neither of its models
        # case_00000's slices are stored unresized: its source prediction is the store's
        vol = read_volume(src / "case_00000" / "imaging.nii.gz")
        np.testing.assert_array_equal(
            ensemble.volume(vol, WINDOW, SIZE), ensemble.store_case(sm, info, "case_00000")
        )
    finally:
        sm.close()


def test_post_processing_applies_to_store_and_volume_outputs(cohort) -> None:  # noqa: F811
    src, store = cohort
    info = open_store(store)
    seen: list[tuple[tuple[int, ...], tuple[float, float, float]]] = []

    def tumour_as_kidney(labels: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        seen.append((labels.shape, spacing))
        return np.where(labels == 2, 1, labels).astype(np.uint8)

    plain = Inference([ThresholdModel()], 1, CPU, batch_size=3)
    post = Inference([ThresholdModel()], 1, CPU, batch_size=3, postprocess=tumour_as_kidney)
    sm = SliceReader(store, info.size)
    try:
        for cid in LABELLED:
            raw = plain.store_case(sm, info, cid)
            assert (raw == 2).any()
            np.testing.assert_array_equal(post.store_case(sm, info, cid), np.minimum(raw, 1))
            assert seen[-1] == (raw.shape, store_spacing(info, cid))
        # the per-case loop (validation, score) carries the post-processed labels
        for case in store_predictions(post, info, LABELLED, reader=sm):
            rows, cols = store_box(info, case.case_id)
            raw = threshold_labels(read_store_images(sm, info, case.case_id))[:, rows, cols]
            np.testing.assert_array_equal(case.pred, np.minimum(raw, 1))
    finally:
        sm.close()
    # source geometry: the step sees the labels axial axis first, with the spacing in that
    # order; case_00004 is stored slices last, (rows, cols, slices)
    refs = find_cases(src)
    seen.clear()
    for case in source_predictions(post, refs, WINDOW, SIZE):
        vol = read_volume(src / case.case_id / "imaging.nii.gz")
        raw = plain.volume(vol, WINDOW, SIZE, case.case_id)
        np.testing.assert_array_equal(case.pred, np.minimum(raw, 1))
        spacing = voxel_spacing(vol.header.affine)
        axial = tuple(raw.shape[a] for a in case.axes)
        assert seen[-1] == (axial, tuple(spacing[a] for a in case.axes))
    assert seen[-1] == ((5, 32, 32), pytest.approx((2.5, 0.8, 0.8)))  # case_00004

    def wrong(labels: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        return labels.astype(np.int64)

    with pytest.raises(ValueError, match="post-processing must return uint8 labels"):
        Inference([ThresholdModel()], 1, CPU, postprocess=wrong).store_case(
            None, info, "case_00000"
        )


def test_inference_checks_its_models_and_settings() -> None:
    model = ThresholdModel()
    single = Inference([model], 0, CPU)
    assert single.models == (model,) and single.region_writes == () and not single.tta
    assert Inference([model], 0, CPU, flips=tta_flips(True)).tta
    assert tta_flips(False) == NO_FLIPS
    # a model without a config takes the decoding it is given
    assert Inference([model], 0, CPU, region_writes=[1, 2]).region_writes == (1, 2)
    with pytest.raises(ValueError, match="one or more models"):
        Inference([], 0, CPU)
    with pytest.raises(ValueError, match="decode differently"):
        Inference([unet(0, True), unet(0, False)], 1, CPU)
    with pytest.raises(ValueError, match="differs from the models' own"):
        Inference([unet(0, True)], 1, CPU, region_writes=(1,))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Inference([model], 0, CPU, batch_size=0)
    with pytest.raises(ValueError, match="flips of dims 2 and 3"):
        Inference([model], 0, CPU, flips=((1,),))
