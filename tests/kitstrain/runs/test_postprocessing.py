"""`record_postprocessing` on a hand-made cross-validation folder: a tiny store, cv.json and
out-of-fold predictions written here; the decision read back for inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS
from kitsprep.store import SliceReader, open_store
from kitstrain.infer.engine import read_store_labels
from kitstrain.infer.postprocess import INSIDE_KIDNEY, KIDNEY_SHARE, LARGEST, Step
from kitstrain.runs.postprocessing import POSTPROCESSING, read_decision, record_postprocessing
from tests.conftest import build, write_kits_case


def kidneys(shape: tuple[int, int, int]) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    seg[1:5, 4:14, 4:14] = 1
    seg[1:4, 18:26, 18:26] = 1
    seg[2:4, 6:9, 6:9] = 2
    return seg


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pp_store")
    rng = np.random.default_rng(0)
    for i in range(3):
        shape = (6, 32, 32)
        write_kits_case(
            root / "src", f"case_{i:05d}", rng.uniform(-300, 500, shape), kidneys(shape)
        )
    build(root / "src", root / "s.h5", size=32, workers=1)
    return root / "s.h5"


def cv_folder(root: Path, store: Path, preds: dict[str, np.ndarray]) -> Path:
    """cv.json naming the store, and one oof/<case>.npz per prediction."""
    (root / "oof").mkdir(parents=True)
    record = {"version": 1, "folds": 2, "store": str(store), "splits": "splits.json"}
    (root / "cv.json").write_text(json.dumps({**record, "fit": {}, "done": [0, 1]}))
    for k, (case_id, pred) in enumerate(preds.items()):
        np.savez(root / "oof" / f"{case_id}.npz", pred=pred, fold=k % 2)
    return root


def stored_labels(store: Path) -> dict[str, np.ndarray]:
    info = open_store(store)
    reader = SliceReader(info.path, info.size, info.case_ids)
    try:
        return {c: read_store_labels(reader, info, c) for c in info.case_ids}
    finally:
        reader.close()


def test_record_postprocessing_decides_on_the_oof_predictions(store: Path, tmp_path: Path) -> None:
    truth = stored_labels(store)
    preds = {c: t.copy() for c, t in truth.items()}
    preds["case_00000"][5, 30, 0] = 1  # a kidney speck
    preds["case_00001"][0:2, 20:28, 0:8] = 2  # a tumour away from the kidneys, not a speck
    cv = cv_folder(tmp_path / "cv", store, preds)
    path = record_postprocessing(cv)
    assert path == cv / POSTPROCESSING and not list(cv.glob(".*.tmp"))
    decision = read_decision(cv, EDITIONS["kits19"])
    assert decision.steps == (Step(LARGEST, "kidney", KIDNEY_SHARE), Step(INSIDE_KIDNEY, "tumour"))
    assert decision.cases == 3 and decision.dice_after == {"kidney": 1.0, "tumour": 1.0}
    assert decision.dice_before["kidney"] < 1.0 and decision.dice_before["tumour"] < 1.0
    # a decision for another edition is refused where it would be applied
    with pytest.raises(KitsError, match="decided for kits19.*--no-postprocess"):
        read_decision(cv, EDITIONS["kits23"])


def test_record_postprocessing_names_what_is_wrong(store: Path, tmp_path: Path) -> None:
    empty = cv_folder(tmp_path / "empty", store, {})
    with pytest.raises(KitsError, match="holds no out-of-fold predictions"):
        record_postprocessing(empty)
    bad = cv_folder(tmp_path / "bad", store, {"case_00000": np.zeros((2, 8, 8), np.uint8)})
    with pytest.raises(KitsError, match=r"holds uint8 \(2, 8, 8\) of fold 0, expected uint8"):
        record_postprocessing(bad)
    (bad / "oof" / "case_00000.npz").write_bytes(b"not a zip")
    with pytest.raises(KitsError, match="not an out-of-fold prediction"):
        record_postprocessing(bad)
    (bad / "cv.json").write_text("{}")
    with pytest.raises(KitsError, match="cv.json does not match this kits"):
        record_postprocessing(bad)
    assert not (bad / POSTPROCESSING).exists()
