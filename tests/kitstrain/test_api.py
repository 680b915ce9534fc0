"""The Python API: the README's example runs as written, `Predictor` gives what `kitstrain
predict` writes, bad input is one KitsError line, and `import kitstrain` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep.cli import main as prep_main
from kitsprep.errors import KitsError
from kitstrain.api import Predictor
from kitstrain.cli import main as train_main
from kitstrain.model.unet import UNet, UNetConfig
from kitstrain.runs.predict import prediction_name
from tests.kitstrain.infer.test_engine import COHORT, make_cohort, make_run, make_store

REPO = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    """The python block of the README's "Python API" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section holds one python example"
    return blocks[0]


def ok(result) -> None:
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What scripts/demo.sh leaves behind, tiny: a synthetic cohort, its store, a short run."""
    root = tmp_path_factory.mktemp("api")
    src, store = root / "data" / "synthetic" / "demo", root / "data" / "demo.h5"
    cli = CliRunner()
    ok(cli.invoke(prep_main, ["synth", "--out", str(src), "--cases", "3", "--size", "32"]))
    ok(cli.invoke(prep_main, ["build", "--src", str(src), "--out", str(store), "--size", "32"]))
    tiny = ["--workers", "0", "--batch-size", "4", "--width", "4", "--depth", "2"]
    args = ["fit", str(store), "--out", str(root / "runs" / "demo"), "--max-steps", "2", *tiny]
    ok(cli.invoke(train_main, [*args, "--device", "cpu", "--seed", "0"]))
    return root


def test_the_readme_example_runs(demo: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(demo)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme"})
    mask = nib.load("case_00000_mask.nii.gz")
    image = nib.load("data/synthetic/demo/case_00000/imaging.nii.gz")
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert capsys.readouterr().out.startswith("kits19 ")


# --------------------------------------------------------------------------- the same numbers


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The five-case cohort of test_engine (non-square, int16 with an intercept, unlabelled,
    slices-last), a random 2.5D model's run, and what `kitstrain predict` wrote for it."""
    root = tmp_path_factory.mktemp("api_same")
    src = make_cohort(root)
    store = make_store(src, root / "slices.h5")
    model = UNet(UNetConfig(in_channels=3, num_classes=3, width=4, depth=2)).eval()
    run = make_run(root / "run", store, model, val=["case_00000"], context=1)
    out = root / "pred"
    ok(CliRunner().invoke(train_main, ["predict", str(run), "--src", str(src), "--out", str(out)]))
    return {"src": src, "run": run, "out": out}


@pytest.fixture(scope="module")
def predictor(setup) -> Predictor:
    return Predictor.from_run(setup["run"], device="cpu")


@pytest.mark.parametrize("cid", ["case_00000", "case_00001", "case_00002", "case_00003"])
def test_predict_equals_what_kitstrain_predict_writes(setup, predictor, cid: str) -> None:
    """Slices-first cases (square, non-square, int16 + intercept, unlabelled) given as HU."""
    hu = nib.load(str(setup["src"] / cid / "imaging.nii.gz")).get_fdata()
    labels = predictor.predict(hu, spacing=(2.5, 0.8, 0.8))
    written = np.asanyarray(nib.load(str(setup["out"] / prediction_name(cid))).dataobj)
    assert labels.dtype == np.uint8 and labels.shape == hu.shape
    assert len(np.unique(written)) > 1  # a model that does not paint one label everywhere
    np.testing.assert_array_equal(labels, written)
    np.testing.assert_array_equal(predictor.predict(hu), labels)  # spacing changes nothing


@pytest.mark.parametrize("cid", list(COHORT))
def test_predict_nifti_keeps_the_geometry_and_equals_the_written_file(
    setup, predictor, cid: str
) -> None:
    img = nib.load(str(setup["src"] / cid / "imaging.nii.gz"))
    mask = predictor.predict_nifti(setup["src"] / cid / "imaging.nii.gz")
    written = nib.load(str(setup["out"] / prediction_name(cid)))
    assert mask.shape == img.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(mask.affine, img.affine)
    for code in ("sform_code", "qform_code"):
        assert int(mask.header[code]) == int(img.header[code])
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), np.asanyarray(written.dataobj))
    assert predictor.labels.edition == "kits19"
    assert dict(predictor.labels.labels) == {"kidney": 1, "tumour": 2}  # 0: background


def one_line_error(call, match: str) -> str:
    with pytest.raises(KitsError, match=match) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_kits_error_line(setup, predictor, tmp_path: Path) -> None:
    msg = one_line_error(lambda: predictor.predict(np.zeros((4, 4))), "expected a 3D volume")
    assert "found shape (4, 4)" in msg and "axial axis first" in msg
    one_line_error(lambda: predictor.predict(np.zeros((2, 4, 4), bool)), "found dtype bool")
    one_line_error(
        lambda: predictor.predict(np.zeros((2, 4, 4)), spacing=(1.0, 0.0)), "3 positive mm"
    )
    one_line_error(
        lambda: predictor.predict_nifti(tmp_path / "nope.nii.gz"), "nope.nii.gz does not exist"
    )
    msg = one_line_error(lambda: Predictor.from_run(tmp_path / "gone"), "does not exist")
    assert "pass a folder written by `kitstrain fit`" in msg
    one_line_error(lambda: Predictor.from_run(setup["run"], which="newest"), "'best' or 'last'")


def test_import_kitstrain_is_light_and_exports_the_api() -> None:
    code = (
        "import sys, kitstrain\n"
        "assert 'torch' not in sys.modules, 'import kitstrain loaded torch'\n"
        "assert {'Predictor', 'SliceDataset', 'open_store'} <= set(dir(kitstrain))\n"
        "from kitstrain import open_store\n"
        "assert 'torch' not in sys.modules, 'open_store loaded torch'\n"
        "from kitstrain import Predictor, SliceDataset\n"
        "import kitstrain.api, kitstrain.data.dataset\n"
        "assert Predictor is kitstrain.api.Predictor\n"
        "assert SliceDataset is kitstrain.data.dataset.SliceDataset\n"
        "try:\n    kitstrain.nothing\nexcept AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
