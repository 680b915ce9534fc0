"""`postprocessing.json`: the connected-component steps decided on a cross-validation's
out-of-fold predictions (`infer.postprocess.decide`), written into the CV folder and read
back by `score`, `predict` and `Predictor` (also from a single run directory holding one)."""

from __future__ import annotations

from pathlib import Path

from kitsprep.errors import KitsError
from kitsprep.files import write_atomic
from kitsprep.labels import LabelSet
from kitsprep.store import SliceReader, open_store
from kitstrain.core.cvdir import OOF, read_cv, read_oof
from kitstrain.infer.engine import read_store_labels, store_box
from kitstrain.infer.postprocess import Decision, decide

__all__ = ["POSTPROCESSING", "read_decision", "record_postprocessing"]

POSTPROCESSING = "postprocessing.json"


def read_decision(folder: Path, labels: LabelSet) -> Decision | None:
    """The decision recorded in `folder` (None where it holds none), checked to be for the
    edition of `labels`."""
    path = Path(folder) / POSTPROCESSING
    if not path.is_file():
        return None
    try:
        decision = Decision.from_json(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KitsError(
            f"{path} is unreadable ({exc}); record it again (kitstrain cv), or pass "
            "--no-postprocess"
        ) from None
    missing = [s.region for s in decision.steps if s.region not in labels.region_names]
    if decision.edition != labels.edition or missing:
        raise KitsError(
            f"{path} was decided for {decision.edition}, but the models segment "
            f"{labels.edition}; record it again for these models, or pass --no-postprocess"
        )
    return decision


def record_postprocessing(cv_dir: Path) -> Path:
    """Decide post-processing on the CV folder's out-of-fold predictions (`oof/<case>.npz`,
    store geometry) against the labels of the store `cv.json` names, scored inside the
    stored image (`store_box`), and write `cv_dir/postprocessing.json` atomically."""
    cv_dir = Path(cv_dir)
    info = open_store(Path(read_cv(cv_dir).store))
    files = sorted((cv_dir / OOF).glob("*.npz"))
    if not files:
        raise KitsError(
            f"{cv_dir / OOF} holds no out-of-fold predictions (<case>.npz); run every "
            "fold with `kitstrain cv` first"
        )
    reader = SliceReader(info.path, info.size, info.case_ids, identity=info.identity)

    def cases():
        for path in files:
            case_id = path.stem
            pred = read_oof(cv_dir, case_id, info)
            truth = read_store_labels(reader, info, case_id)
            rows, cols = store_box(info, case_id)
            yield case_id, pred[:, rows, cols], truth[:, rows, cols]

    try:
        decision = decide(cases(), info.labels)
    finally:
        reader.close()
    return write_atomic(cv_dir / POSTPROCESSING, decision.to_json() + "\n")
