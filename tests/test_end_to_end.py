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
    ok(r.invoke(kitsprep, ["build", "--src", "cohort", "--out", "s.h5", "--size", "32",
                           "--workers", "1"]))
    info = json.loads(ok(r.invoke(kitsprep, ["info", "s.h5", "--json"])))
    assert info["cases"] == 5 and info["unlabelled_cases"] == 1 and info["size"] == 32
    ok(r.invoke(kitsprep, ["verify", "s.h5", "--src", "cohort"]))
    out = ok(r.invoke(kitstrain, ["fit", "s.h5", "--max-steps", "4", "--workers", "0",
                                  "--batch-size", "4", "--width", "4", "--depth", "2"]))
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
    ok(r.invoke(kitstrain, ["predict", str(run_dir), "--src", "cohort", "--out", "pred",
                            "--cases", f"1,{unlabelled}"]))
    for cid in ("case_00001", unlabelled):
        src = nib.load(f"cohort/{cid}/imaging.nii.gz")
        pred = nib.load(f"pred/prediction_{cid[5:]}.nii.gz")
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
        assert pred.get_data_dtype() == np.uint8
