"""The one inference path: context stacking, batching, flips, store and source geometry.

Also home of the tiny cohort, store and run-directory helpers that test_score and
test_predict import: five small NIfTI cases covering the KiTS19 storage variants (square
float32, non-square, int16 with an intercept, unlabelled, and slices-last orientation).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from kitsprep.cases import read_volume
from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS
from kitsprep.store import SliceReader, open_store
from kitsprep.window import WINDOW_PRESETS
from kitstrain.core import rundir as runlib
from kitstrain.infer.cases import score_store_cases
from kitstrain.infer.engine import (
    NO_FLIPS,
    TTA_FLIPS,
    _eval_mode,
    _labels_u8,
    _score_batches,
    predict_store_case,
    predict_volume,
    read_store_images,
    read_store_labels,
    stack_context,
    store_box,
)
from kitstrain.infer.inference import Inference
from kitstrain.metrics import DiceCounts, score_from_counts
from kitstrain.model.unet import UNet, UNetConfig
from tests.conftest import build

WINDOW = WINDOW_PRESETS["mlperf"]
SIZE = 32
KITS_AFFINE = np.array([[0, 0, -0.8, 0], [0, -0.8, 0, 0], [-2.5, 0, 0, 0], [0, 0, 0, 1.0]])
# Slices last (RAS): the store permutes axes (2, 0, 1), so predictions must be permuted back.
RAS_AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])

# (shape as (slices, rows, cols), imaging dtype, labelled, slices last)
COHORT = {
    "case_00000": ((6, 32, 32), "float32", True, False),
    "case_00001": ((5, 24, 40), "float32", True, False),  # non-square
    "case_00002": ((4, 32, 32), "int16", True, False),  # raw = HU + 1024, scl_inter -1024
    "case_00003": ((4, 20, 20), "float32", False, False),  # unlabelled
    "case_00004": ((5, 32, 32), "float32", True, True),  # slices-last orientation
}
LABELLED = [c for c, v in COHORT.items() if v[2]]

# Kidney and tumour intensities (HU) and the thresholds between them, normalised by the
# window the way the store is: what ThresholdModel compares against.
T_KIDNEY = WINDOW.normalise(100.0)
T_TUMOUR = WINDOW.normalise(200.0)
UNET = UNetConfig(in_channels=1, num_classes=3, width=4, depth=2)


def official_dice(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Reference: the KiTS19 starter code's formula, written out independently."""
    out = []
    for level in (0, 1):
        p, g = np.greater(pred, level), np.greater(gt, level)
        denom = p.sum() + g.sum()
        out.append(1.0 if denom == 0 else float(2 * np.logical_and(p, g).sum() / denom))
    return out[0], out[1]


def paint(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """HU (slices, rows, cols) with a body, a kidney (150 HU) and a tumour (250 HU), and a
    mask whose boxes are shifted one voxel from the painted ones: partial overlap, so that
    Dice is neither 0 nor 1."""
    s, h, w = shape
    hu = np.full(shape, -1000.0, np.float32)
    hu[:, h // 8 : h - h // 8, w // 8 : w - w // 8] = 40.0
    r0, c0, hk, wk = h // 4, w // 4, h // 3, w // 3
    hu[1 : s - 1, r0 : r0 + hk, c0 : c0 + wk] = 150.0
    hu[2 : s - 1, r0 + 1 : r0 + 1 + hk // 2, c0 + 1 : c0 + 1 + wk // 2] = 250.0
    seg = np.zeros(shape, np.uint8)
    seg[1 : s - 1, r0 + 1 : r0 + 1 + hk, c0 : c0 + wk] = 1
    seg[2 : s - 1, r0 + 1 : r0 + 1 + hk // 2, c0 + 2 : c0 + 2 + wk // 2] = 2
    return hu, seg


def make_cohort(root: Path) -> Path:
    """Write the COHORT in KiTS19 layout under root/src; returns that folder."""
    src = root / "src"
    for cid, (shape, dtype, labelled, slices_last) in COHORT.items():
        hu, seg = paint(shape)
        affine = KITS_AFFINE
        if slices_last:
            hu, seg, affine = hu.transpose(1, 2, 0), seg.transpose(1, 2, 0), RAS_AFFINE
        folder = src / cid
        folder.mkdir(parents=True)
        if dtype == "int16":
            img = nib.Nifti1Image((hu + 1024).astype(np.int16), affine)
            img.header.set_data_dtype(np.int16)
            img.header.set_slope_inter(1.0, -1024.0)  # after construction, or nibabel resets it
        else:
            img = nib.Nifti1Image(hu, affine)
            img.header.set_data_dtype(np.float32)
        img.header.set_sform(affine, code=2)
        img.header.set_qform(affine, code=1)
        nib.save(img, str(folder / "imaging.nii.gz"))
        if labelled:
            nib.save(nib.Nifti1Image(seg, affine), str(folder / "segmentation.nii.gz"))
    return src


def make_store(src: Path, out: Path, size: int = SIZE) -> Path:
    build(src, out, size=size, workers=1)
    return out


def constant_unet(cls: int) -> UNet:
    """A real UNet that predicts class `cls` everywhere: zero head weights, one-hot bias."""
    model = UNet(UNET)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([5.0 if c == cls else 0.0 for c in range(3)]))
    return model.eval()


def make_run(
    run_dir: Path,
    store: Path,
    model: UNet,
    *,
    val: list[str],
    train: list[str] | None = None,
    context: int = 0,
) -> Path:
    """A run directory as `kitstrain fit` leaves it, with `model` as the best checkpoint."""
    run_dir.mkdir(parents=True)
    info = open_store(store)
    runlib.write_json(
        run_dir / runlib.CONFIG,
        {
            "store": str(store),
            "store_fingerprint": info.fingerprint,
            "store_attrs": {
                "window": asdict(info.window),
                "size": info.size,
                "num_classes": info.num_classes,
                "labels": json.loads(info.labels.to_json()),
                "spacing": info.spacing.mm,
            },
            "train": {"precision": "auto"},
            "context": context,
            "model": asdict(model.cfg),
        },
    )
    runlib.write_json(run_dir / runlib.SPLIT, {"train": train or [], "val": val})
    runlib.save_checkpoint(runlib.checkpoint_path(run_dir, "best"), {"model": model.state_dict()})
    return run_dir


class ThresholdModel(nn.Module):
    """Thresholds the centre channel: < T_KIDNEY background, then kidney, >= T_TUMOUR
    tumour, as one-hot logits. Pointwise, so its output is known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # so the module has a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1] // 2
        c = x[:, k : k + 1].float()
        return (
            torch.cat(
                [c < T_KIDNEY, (c >= T_KIDNEY) & (c < T_TUMOUR), c >= T_TUMOUR], dim=1
            ).float()
            + 0 * self.anchor
        )


def threshold_labels(normalised: np.ndarray) -> np.ndarray:
    v = np.asarray(normalised, np.float32)
    return np.where(v >= T_TUMOUR, 2, np.where(v >= T_KIDNEY, 1, 0)).astype(np.uint8)


def window_reference(hu: np.ndarray) -> np.ndarray:
    """The store's normalisation in numpy: clip, shift, scale in float32, round to float16."""
    v = np.clip(hu.astype(np.float32), np.float32(WINDOW.lo), np.float32(WINDOW.hi))
    v = (v - np.float32(WINDOW.offset)) / np.float32(WINDOW.divisor)
    return v.astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("infer")
    src = make_cohort(root)
    return src, make_store(src, root / "slices.h5")


CPU = torch.device("cpu")


# --------------------------------------------------------------------------- pure parts


def test_stack_context_orders_channels_and_clamps_at_the_ends() -> None:
    vol = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 3), np.float32)
    out = stack_context(vol, 1)
    assert out.shape == (4, 3, 2, 3)
    assert out[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert stack_context(vol, 0).shape == (4, 1, 2, 3)
    np.testing.assert_array_equal(stack_context(vol, 2, 1, 3), stack_context(vol, 2)[1:3])


class Ramp(nn.Module):
    """Ignores its input: channel 0 is the column index, channel 1 the row index."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = torch.arange(w, dtype=torch.float32).expand(n, 1, h, w)
        rows = torch.arange(h, dtype=torch.float32)[:, None].expand(n, 1, h, w)
        return torch.cat([cols, rows], dim=1)


def logits_of(
    model: nn.Module, images: torch.Tensor, *, amp: bool, tta: bool, batch_size: int
) -> torch.Tensor:
    """All logits of `images` through the engine's batching, on the CPU."""
    with _eval_mode(model):
        parts = [
            logits
            for _, _, logits in _score_batches(
                Inference(
                    [model],
                    0,
                    CPU,
                    amp=amp,
                    flips=TTA_FLIPS if tta else NO_FLIPS,
                    batch_size=batch_size,
                ),
                lambda a, b: images[a:b],
                len(images),
            )
        ]
    return torch.cat(parts)


def test_batches_and_flip_averaging() -> None:
    x = torch.zeros(7, 1, 4, 6, dtype=torch.float16)
    plain = logits_of(Ramp(), x, amp=True, tta=False, batch_size=3)
    assert plain.dtype == torch.float32 and plain.shape == (7, 2, 4, 6)
    assert torch.equal(plain, logits_of(Ramp(), x, amp=False, tta=False, batch_size=7))
    tta = logits_of(Ramp(), x, amp=False, tta=True, batch_size=3)
    # Each flip is undone on the output, so a ramp averages with its mirror: the centre.
    assert torch.allclose(tta[:, 0], torch.full((7, 4, 6), 2.5))
    assert torch.allclose(tta[:, 1], torch.full((7, 4, 6), 1.5))


def test_inference_restores_the_training_mode() -> None:
    model = UNet(UNET)
    model.train()
    logits_of(model, torch.zeros(2, 1, 8, 8), amp=False, tta=False, batch_size=1)
    assert model.training
    model.eval()
    logits_of(model, torch.zeros(2, 1, 8, 8), amp=False, tta=False, batch_size=1)
    assert not model.training


# --------------------------------------------------------------------------- store geometry


def test_predict_store_case_is_the_model_applied_to_the_stored_slices(cohort) -> None:
    _, store = cohort
    info = open_store(store)
    sm = SliceReader(store, info.size)
    try:
        for cid in info.case_ids:
            images = read_store_images(sm, info, cid)
            pred = predict_store_case(
                Inference([ThresholdModel()], 0, CPU, amp=False, flips=TTA_FLIPS, batch_size=4),
                sm,
                info,
                cid,
            )
            assert pred.dtype == np.uint8 and pred.shape == (info.cases[cid].slices, SIZE, SIZE)
            np.testing.assert_array_equal(pred, threshold_labels(images))
    finally:
        sm.close()


def test_score_store_cases_equals_the_official_formula(cohort) -> None:
    _, store = cohort
    info = open_store(store)
    done: list[int] = []
    scores = score_store_cases(
        Inference([ThresholdModel()], 1, CPU, amp=True, flips=NO_FLIPS, batch_size=3),
        info,
        LABELLED,
        progress=done.append,
    )
    assert [s.case for s in scores] == LABELLED
    assert sum(done) == sum(info.cases[c].slices for c in LABELLED)
    sm = SliceReader(store, info.size)
    try:
        for s in scores:
            # Scores count the stored image, not the padding around it.
            rows, cols = store_box(info, s.case)
            pred = threshold_labels(read_store_images(sm, info, s.case))[:, rows, cols]
            truth = read_store_labels(sm, info, s.case)[:, rows, cols]
            kidney, tumour = official_dice(pred, truth)
            assert 0.0 < kidney < 1.0 and 0.0 < tumour < 1.0  # a test with teeth
            assert s.dice["kidney"] == pytest.approx(kidney, abs=1e-12)
            assert s.dice["tumour"] == pytest.approx(tumour, abs=1e-12)
            assert s.accuracy == pytest.approx(np.mean(pred == truth))
            assert s.background_accuracy == pytest.approx(np.mean(truth == 0))
    finally:
        sm.close()
    assert store_box(info, "case_00001") == (slice(6, 25), slice(0, 32))  # 24x40 -> 19x32
    # the whole-case score equals counting the stored image slice by slice
    sm = SliceReader(store, info.size)
    try:
        for s in scores[:2]:
            rows, cols = store_box(info, s.case)
            pred = predict_store_case(
                Inference([ThresholdModel()], 1, CPU, amp=True, batch_size=8), sm, info, s.case
            )
            counts = DiceCounts(info.labels)
            for i, row in enumerate(info.rows(s.case)):
                counts.add(pred[i, rows, cols], sm.label(row)[rows, cols])
            assert score_from_counts(s.case, counts) == s
    finally:
        sm.close()


def test_score_store_cases_refuses_unlabelled_and_unknown_cases(cohort) -> None:
    _, store = cohort
    info = open_store(store)
    with pytest.raises(KitsError, match="case_00003 is unlabelled"):
        score_store_cases(Inference([ThresholdModel()], 0, CPU, batch_size=4), info, ["case_00003"])
    with pytest.raises(KitsError, match="case_00099 is not in the store"):
        score_store_cases(Inference([ThresholdModel()], 0, CPU, batch_size=4), info, ["case_00099"])


# --------------------------------------------------------------------------- source geometry


@pytest.mark.parametrize("cid", ["case_00000", "case_00002", "case_00004"])
def test_predict_volume_inverts_the_store_geometry_exactly(cohort, cid: str) -> None:
    """Cases whose slices are already 32x32: no resampling, so the prediction in source
    geometry must be the threshold of the windowed source voxels, voxel for voxel, in the
    source's axis order (case_00004 is stored slices-last) and scaling (case_00002 is int16
    with an intercept)."""
    src, _ = cohort
    vol = read_volume(src / cid / "imaging.nii.gz")
    pred = predict_volume(
        Inference([ThresholdModel()], 1, CPU, amp=False, flips=NO_FLIPS, batch_size=2),
        vol,
        WINDOW,
        SIZE,
    )
    hu = np.asarray(vol.data, np.float32) * vol.header.slope + vol.header.inter
    assert pred.shape == vol.data.shape and pred.dtype == np.uint8
    np.testing.assert_array_equal(pred, threshold_labels(window_reference(hu)))


@pytest.mark.parametrize("cid", ["case_00001", "case_00003"])
def test_predict_volume_resamples_back_to_the_source_grid(cohort, cid: str) -> None:
    """Non-square (24x40 -> 19x32 + padding) and upsampled (20x20 -> 32x32) cases: the
    bilinear way back may move an edge by a voxel, never more."""
    src, _ = cohort
    vol = read_volume(src / cid / "imaging.nii.gz")
    pred = predict_volume(
        Inference([ThresholdModel()], 0, CPU, amp=False, flips=NO_FLIPS, batch_size=4),
        vol,
        WINDOW,
        SIZE,
    )
    hu = np.asarray(vol.data, np.float32) * vol.header.slope + vol.header.inter
    ref = threshold_labels(window_reference(hu))
    assert pred.shape == vol.data.shape and pred.dtype == np.uint8
    assert np.mean(pred == ref) > 0.98
    kidney, _ = official_dice(pred, ref)
    assert kidney > 0.9


def test_region_logits_decode_in_write_back_order() -> None:
    from kitstrain.infer.engine import logits_to_labels

    logits = torch.full((1, 2, 2, 3), -5.0)
    logits[0, 0, 0, 1:] = 5.0  # kidney+tumour region at (0,1), (0,2)
    logits[0, 1, 0, 2] = 5.0  # tumour at (0,2)
    logits[0, 1, 1, 0] = 5.0  # tumour outside the kidney region still reads tumour
    labels = logits_to_labels(logits, tuple(r.writes for r in EDITIONS["kits19"].regions))
    assert labels.dtype == torch.uint8
    assert labels[0].tolist() == [[0, 1, 2], [2, 0, 0]]
    classes = torch.zeros(1, 3, 1, 2)
    classes[0, 2, 0, 0] = 1.0
    classes[0, 1, 0, 1] = 1.0
    assert logits_to_labels(classes).tolist() == [[[2, 1]]]
    with pytest.raises(ValueError, match="expected 3 region logits"):
        logits_to_labels(logits, (1, 3, 2))


@pytest.mark.parametrize("edition", sorted(EDITIONS))
def test_decoding_perfect_region_logits_gives_the_labels_back(edition: str) -> None:
    from kitstrain.infer.engine import logits_to_labels
    from kitstrain.model.losses import region_lut, region_targets

    ls = EDITIONS[edition]
    labels = torch.from_numpy(
        np.random.default_rng(1).integers(0, ls.num_classes, (2, 6, 7))
    ).long()
    perfect = 10.0 * (2 * region_targets(labels, region_lut(ls)) - 1)
    writes = tuple(r.writes for r in ls.regions)
    assert torch.equal(logits_to_labels(perfect, writes), labels.to(torch.uint8))
    # a model carries what decoding needs: the same labels through its config
    cfg = UNetConfig(
        num_classes=ls.num_classes, width=4, depth=2, regions=True, region_writes=writes
    )
    assert torch.equal(
        torch.from_numpy(_labels_u8(Inference([UNet(cfg)], 0, CPU), perfect)),
        labels.to(torch.uint8),
    )


@pytest.mark.parametrize("edition", sorted(EDITIONS))
def test_region_decoding_is_the_label_sets_write_back(edition: str) -> None:
    """The torch decoder and `kitsprep.labels.write_back` agree on any logits, overlaps
    included; a label set and its write order decode the same."""
    from kitsprep.labels import write_back
    from kitstrain.infer.engine import logits_to_labels

    ls = EDITIONS[edition]
    logits = torch.randn(3, len(ls.regions), 5, 6, generator=torch.Generator().manual_seed(4))
    want = np.stack([write_back(m, ls.write_order) for m in (logits > 0).numpy()])
    assert np.array_equal(logits_to_labels(logits, ls.write_order).numpy(), want)
    assert torch.equal(logits_to_labels(logits, ls), logits_to_labels(logits, ls.write_order))
