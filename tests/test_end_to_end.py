"""The whole product on CPU, as a newcomer runs it: synth -> build -> verify -> fit a few
steps -> score -> predict, through the two CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from kitsprep.cli import main as kitsprep
from kitstrain.cli import main as kitstrain


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def test_synth_build_fit_score_predict(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default run root is ./runs
    r = CliRunner()
    ok(r.invoke(kitsprep, ["synth", "--out", "cohort", "--cases", "5", "--size", "32"]))
    ok(
        r.invoke(
            kitsprep,
            ["build", "--src", "cohort", "--out", "s.h5", "--size", "32", "--workers", "1"],
        )
    )
    info = json.loads(ok(r.invoke(kitsprep, ["info", "s.h5", "--json"])))
    assert info["cases"] == 5 and info["unlabelled_cases"] == 1 and info["size"] == 32
    ok(r.invoke(kitsprep, ["verify", "s.h5", "--src", "cohort"]))
    out = ok(
        r.invoke(
            kitstrain,
            [
                "fit",
                "s.h5",
                "--max-steps",
                "4",
                "--workers",
                "0",
                "--batch-size",
                "4",
                "--width",
                "4",
                "--depth",
                "2",
            ],
        )
    )
    assert "done (max_steps) after 4 steps" in out
    run_dir = next(Path("runs").iterdir())
    table = ok(r.invoke(kitstrain, ["score", "--json", "score.json", "--overlays", "ov"]))
    assert "kidney" in table and "mean" in table
    report = json.loads(Path("score.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    assert len(list(Path("ov").glob("*.png"))) == len(split["val"])
    assert (run_dir / "score.csv").is_file()
    text = json.dumps(report)
    for case in split["val"]:
        assert case in text
    unlabelled = "case_00004"
    ok(
        r.invoke(
            kitstrain,
            [
                "predict",
                str(run_dir),
                "--src",
                "cohort",
                "--out",
                "pred",
                "--cases",
                f"1,{unlabelled}",
            ],
        )
    )
    for cid in ("case_00001", unlabelled):
        src = nib.load(f"cohort/{cid}/imaging.nii.gz")
        pred = nib.load(f"pred/prediction_{cid[5:]}.nii.gz")
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
        assert pred.get_data_dtype() == np.uint8


def kits23_cohort(root: Path, n: int = 4) -> Path:
    """KiTS23-like cases by hand: kidney boxes with a tumour, and a cyst (label 3) in some."""
    from tests.conftest import write_kits_case

    rng = np.random.default_rng(23)
    for i in range(n):
        seg = np.zeros((6, 32, 32), np.uint8)
        seg[1:5, 8:20, 6:16] = 1
        seg[1:5, 10:22, 18:28] = 1
        seg[2:4, 10:14, 8:12] = 2
        if i % 2 == 0:
            seg[2:4, 14:18, 20:24] = 3
        hu = rng.normal(-100, 20, seg.shape) + 150 * (seg == 1) + 80 * (seg == 2)
        write_kits_case(root, f"case_{i:05d}", hu, seg)
    return root


def test_kits23_build_fit_score_predict(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = CliRunner()
    kits23_cohort(Path("cohort"))
    out = ok(
        r.invoke(
            kitsprep,
            ["build", "--src", "cohort", "--out", "s.h5", "--size", "32", "--workers", "1"],
        )
    )
    assert "kits23" in out  # auto: a mask holds label 3
    out = ok(
        r.invoke(
            kitstrain,
            [
                "fit",
                "s.h5",
                "--max-steps",
                "3",
                "--workers",
                "0",
                "--batch-size",
                "4",
                "--width",
                "4",
                "--depth",
                "2",
                "--out",
                "runs/k23",
            ],
        )
    )
    val = [json.loads(line) for line in Path("runs/k23/metrics.jsonl").read_text().splitlines()]
    val = [v for v in val if v.get("kind") == "val"][-1]
    assert val["regions"] == ["kidney_and_mass", "mass", "tumor"]
    assert all(0.0 <= val[f"{n}_dice"] <= 1.0 for n in val["regions"])
    assert "validation Dice kidney_and_mass" in out

    table = ok(r.invoke(kitstrain, ["score", "runs/k23", "--json", "score.json"]))
    for name in ("kidney_and_mass", "mass", "tumor"):
        assert f"Dice {name}" in table and f"surface {name}" in table
    report = json.loads(Path("score.json").read_text())
    assert report["edition"] == "kits23"
    assert [g["tolerance_mm"] for g in report["regions"]] == [
        1.0330772532390826,
        1.1328796488598762,
        1.1498198361434828,
    ]
    for row in [*report["cases"], report["mean"]]:
        for name in ("kidney_and_mass", "mass", "tumor"):
            assert 0.0 <= row[f"{name}_dice"] <= 1.0
            assert 0.0 <= row[f"{name}_surface_dice"] <= 1.0

    out = ok(
        r.invoke(
            kitstrain,
            ["predict", "runs/k23", "--src", "cohort", "--out", "pred", "--device", "cpu"],
        )
    )
    split = json.loads(Path("runs/k23/split.json").read_text())
    assert f"{len(split['train'])} of 4 case(s) were in the run's training split" in out
    for i in range(4):
        src = nib.load(f"cohort/case_{i:05d}/imaging.nii.gz")
        pred = nib.load(f"pred/case_{i:05d}.nii.gz")
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
        assert pred.get_data_dtype() == np.uint8
    assert not list(Path("pred").glob("prediction_*"))
    r2 = r.invoke(
        kitstrain,
        [
            "predict",
            "runs/k23",
            "--src",
            "cohort",
            "--out",
            "p19",
            "--naming",
            "kits19",
            "--cases",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert r2.exit_code == 0 and Path("p19/prediction_00000.nii.gz").is_file()
