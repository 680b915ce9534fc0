"""Overlays and curves: files appear, the right slice is shown, empty masks are fine."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS
from kitstrain.core import rundir as runlib
from kitstrain.report.plots import (
    case_overlay,
    dice_curves,
    overlay_slice,
    plot_curves,
    region_colours,
)

KITS19 = EDITIONS["kits19"]


def test_overlay_slice_prefers_true_tumour_then_kidney_then_prediction() -> None:
    truth = np.zeros((5, 4, 4), np.uint8)
    pred = np.zeros((5, 4, 4), np.uint8)
    assert overlay_slice(truth, pred, KITS19) == 2  # nothing anywhere: the middle
    pred[4, :2] = 2
    assert overlay_slice(None, pred, KITS19) == 4
    assert overlay_slice(truth, pred, KITS19) == 4  # a truth without kidney: the prediction
    truth[1] = 1
    assert overlay_slice(truth, pred, KITS19) == 1
    truth[3, 0, 0] = 2
    assert overlay_slice(truth, pred, KITS19) == 3  # the most tumour beats the most kidney


def test_overlay_slice_follows_the_editions_regions() -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[1] = 3  # a cyst slice: in KiTS23's mass region, not in its tumor region
    truth[2, 0, :2] = 2
    assert overlay_slice(truth, truth, EDITIONS["kits23"]) == 2  # tumor first
    truth[2] = 0
    assert overlay_slice(truth, truth, EDITIONS["kits23"]) == 1  # then mass


def test_case_overlay_draws_truth_beside_prediction(tmp_path: Path) -> None:
    image = np.linspace(-1, 3, 24 * 40, dtype=np.float32).reshape(24, 40)
    truth = np.zeros((24, 40), np.uint8)
    truth[5:15, 10:20] = 1
    truth[8:12, 12:16] = 2
    full = np.ones_like(truth)  # a mask covering the slice still gets its frame
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "no contour levels" on an empty mask
        both = case_overlay(
            image, truth, full, "case_00001  kidney Dice 0.5", tmp_path / "a.png", KITS19
        )
        alone = case_overlay(
            image,
            None,
            np.zeros_like(truth),
            "case_00003",
            tmp_path / "sub" / "b.png",
            KITS19,
            vmin=-1.0,
            vmax=3.0,
        )
    wide, narrow = matplotlib.image.imread(both), matplotlib.image.imread(alone)
    assert wide.shape[1] > 1.5 * narrow.shape[1]  # two panels against one
    # Kidney red and tumour blue pixels are drawn on the truth panel.
    rgb = wide[..., :3]
    assert ((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)).any()
    assert ((rgb[..., 2] > 0.8) & (rgb[..., 0] < 0.3) & (rgb[..., 1] < 0.3)).any()


def test_case_overlay_outlines_a_kits23_cyst_in_the_mass_colour(tmp_path: Path) -> None:
    image = np.zeros((24, 40), np.float32)
    truth = np.zeros((24, 40), np.uint8)
    truth[5:15, 10:20] = 1
    truth[8:12, 25:30] = 3  # a cyst: kidney_and_mass and mass, not tumor
    path = case_overlay(image, truth, truth, "case_00002", tmp_path / "c.png", EDITIONS["kits23"])
    assert region_colours(3) == ["red", "tab:green", "blue"]
    rgb = matplotlib.image.imread(path)[..., :3]
    green = (rgb[..., 1] > 0.4) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)
    blue = (rgb[..., 2] > 0.8) & (rgb[..., 0] < 0.3) & (rgb[..., 1] < 0.3)
    assert green.any() and not blue.any()  # a cyst is no tumour


def test_plot_curves_reads_the_metrics_log(tmp_path: Path) -> None:
    with pytest.raises(KitsError, match="no training metrics"):
        plot_curves(tmp_path)
    lines = [{"kind": "train", "step": s, "loss": 1.0 / s, "lr": 0.001} for s in range(1, 30)]
    lines += [
        {
            "kind": "val",
            "step": s,
            "epoch": s // 10,
            "regions": ["kidney", "tumour"],
            "kidney_dice": 0.1 * e,
            "tumour_dice": 0.05 * e,
            "mean_dice": 0.075 * e,
        }
        for e, s in enumerate((10, 20, 29), start=1)
    ]
    lines.append({"kind": "event", "message": "resumed"})  # other records are ignored
    (tmp_path / runlib.METRICS).write_text("".join(json.dumps(r) + "\n" for r in lines))
    path = plot_curves(tmp_path)
    assert path == tmp_path / "curves.png"
    assert matplotlib.image.imread(path).shape[2] in (3, 4)
    assert plot_curves(tmp_path, tmp_path / "other.png").is_file()


def test_plot_curves_draws_the_regions_the_run_logged(tmp_path: Path) -> None:
    regions = ["kidney_and_mass", "mass", "tumor"]
    val = [
        {
            "kind": "val",
            "step": s,
            "regions": regions,
            "mean_dice": 0.1 * s,
            **{f"{n}_dice": 0.1 * s for n in regions},
        }
        for s in (1, 2)
    ]
    assert [k for k, _, _ in dice_curves(val)] == [
        "kidney_and_mass_dice",
        "mass_dice",
        "tumor_dice",
        "mean_dice",
    ]
    # the regions come from the records alone, never from a guessed edition
    bare = [{"kind": "val", "step": 1, "kidney_dice": 0.5, "tumour_dice": 0.2, "mean_dice": 0.35}]
    assert [k for k, _, _ in dice_curves(bare)] == ["mean_dice"]
    lines = [{"kind": "train", "step": 1, "loss": 1.0, "lr": 0.001}, *val]
    (tmp_path / runlib.METRICS).write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert plot_curves(tmp_path).is_file()
