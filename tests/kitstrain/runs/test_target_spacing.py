"""A run trained on a store with a target spacing (`kitsprep build --spacing`) predicts new
volumes through the same rule: resampled to the store's spacing, cropped to the body,
and mapped back through the inverse (background outside the crop), in `predict`,
`score --src` and `Predictor`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kitsprep.cases import read_volume
from kitsprep.errors import KitsError
from kitsprep.spacing import case_plane
from kitsprep.store import open_store
from kitstrain.api import Predictor
from kitstrain.cli import main
from kitstrain.core import rundir as runlib
from kitstrain.infer.engine import NO_FLIPS
from kitstrain.infer.inference import Inference
from kitstrain.runs.loaded import load_run
from tests.conftest import build
from tests.kitsprep.conftest import kits_affine, write_case
from tests.kitsprep.test_target_spacing import body_case
from tests.kitstrain.infer.test_engine import (
    WINDOW,
    ThresholdModel,
    constant_unet,
    make_run,
    threshold_labels,
    window_reference,
)

TARGET = 0.8
# (in-plane mm, body radius in px): the same body at three spacings
CASES = [(0.4, 18), (0.8, 9), (1.0, 7)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("target_spacing")
    src = root / "src"
    for case, (pixel, radius) in enumerate(CASES):
        image, seg = body_case(4, 48, radius, case, centre=(20, 26))
        write_case(src, case, image, seg, affine=kits_affine(2.5, pixel))
    store = root / "s.h5"
    build(src, store, size=32, workers=1, spacing=f"{TARGET}")
    run = make_run(root / "run", store, constant_unet(1), val=["case_00001"])
    return {"root": root, "src": src, "store": store, "run": run}


def test_the_run_records_the_stores_target_spacing(setup) -> None:
    assert open_store(setup["store"]).spacing.mm == TARGET
    assert load_run(setup["run"], None).spacing == TARGET


def test_predict_maps_back_through_the_crop(setup, tmp_path: Path) -> None:
    """A model that says kidney everywhere marks exactly the crop the rule chooses from
    the volume's body: resampled at the store's spacing, background outside."""
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        main,
        ["predict", str(setup["run"]), "--src", str(setup["src"]), "--out", str(out)]
        + ["--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    predictor = Predictor.from_run(setup["run"], device="cpu")
    for case, (pixel, _) in enumerate(CASES):
        path = setup["src"] / f"case_{case:05d}" / "imaging.nii.gz"
        vol = read_volume(path, "x")
        plane = case_plane(np.asarray(vol.data), 1.0, 0.0, (pixel, pixel), 32, TARGET)
        want = np.zeros(vol.data.shape, np.uint8)
        want[(slice(None), *plane.crop)] = 1
        # 48 px at 0.4 mm fit the square whole (padded); the others are cropped
        assert ((plane.crop_h, plane.crop_w) == vol.data.shape[1:]) == (pixel == 0.4)
        got = np.asarray(nib.load(str(out / f"prediction_{case:05d}.nii.gz")).dataobj)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.asarray(predictor.predict_nifti(path).dataobj), want)
        hu = nib.load(str(path)).get_fdata(dtype=np.float32)
        np.testing.assert_array_equal(predictor.predict(hu, spacing=(2.5, pixel, pixel)), want)


def test_predictor_needs_the_spacing_of_a_spacing_run(setup) -> None:
    predictor = Predictor.from_run(setup["run"], device="cpu")
    with pytest.raises(KitsError, match=r"resamples slices to 0\.8 mm.*spacing=") as err:
        predictor.predict(np.zeros((2, 32, 32)))
    assert "\n" not in str(err.value)


def test_source_geometry_labels_are_exact_at_the_stores_own_spacing(setup) -> None:
    """At the target spacing itself the crop, pad and inverse lose nothing: a pointwise
    model's labels are those of the source voxels inside the crop."""
    path = setup["src"] / "case_00001" / "imaging.nii.gz"
    vol = read_volume(path, "case_00001")
    inference = Inference([ThresholdModel()], 0, torch.device("cpu"), amp=False, flips=NO_FLIPS)
    got = inference.volume(vol, WINDOW, 32, "case_00001", target_spacing=TARGET)
    image = np.asarray(vol.data)
    plane = case_plane(image, 1.0, 0.0, (TARGET, TARGET), 32, TARGET)
    want = np.zeros(image.shape, np.uint8)
    crop = (slice(None), *plane.crop)
    want[crop] = threshold_labels(window_reference(image[crop]))
    np.testing.assert_array_equal(got, want)
    assert (want == 1).any()


def test_score_src_runs_in_source_geometry(setup, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    result = CliRunner().invoke(
        main,
        ["score", str(setup["run"]), "--src", str(setup["src"]), "--json", str(out)]
        + ["--device", "cpu", "--cases", "0-2"],
    )
    assert result.exit_code == 0, result.output
    cases = json.loads(out.read_text())["cases"]
    assert [c["case"] for c in cases] == ["case_00000", "case_00001", "case_00002"]


def test_a_store_of_another_spacing_is_refused(setup, tmp_path: Path) -> None:
    other = tmp_path / "none.h5"
    build(setup["src"], other, size=32, workers=1)
    with pytest.raises(KitsError, match=r"built with --spacing none.*trained on --spacing 0\.8"):
        load_run(setup["run"], other)
    # the store gone: the spacing the run recorded still applies
    run = tmp_path / "moved"
    shutil.copytree(setup["run"], run)
    config = json.loads((run / runlib.CONFIG).read_text())
    config["store"] = str(tmp_path / "gone.h5")
    (run / runlib.CONFIG).write_text(json.dumps(config))
    assert load_run(run, None, store_required=False).spacing == TARGET
