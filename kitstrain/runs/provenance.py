"""Which run (or ensemble of runs) wrote a folder of predictions: `kitstrain predict`
records it there (`PROVENANCE`: run(s), checkpoint, flips, post-processing steps) and
refuses, in one line, to add another run's predictions to the folder, which would leave a
mix of two models that no file name tells apart. `--overwrite` clears the old predictions
first; the same run again just writes them again."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from kitsprep.errors import KitsError
from kitsprep.files import write_atomic
from kitstrain.infer.engine import PostProcess
from kitstrain.infer.inference import Inference
from kitstrain.infer.postprocess import Postprocessor
from kitstrain.runs.loaded import LoadedRun

__all__ = ["PROVENANCE", "claim_folder", "provenance"]

PROVENANCE = "kitstrain-predict.json"
# what the evaluators' names look like (KiTS19 prediction_XXXXX, KiTS21/23 case_XXXXX)
PREDICTION_RE = re.compile(r"^(prediction|case)_\d{5}\.nii\.gz$")


def provenance(runs: Sequence[LoadedRun], inference: Inference) -> dict:
    """What decides the predictions' values: the run (an ensemble's runs, comma-separated),
    its checkpoint, flips, post-processing steps."""
    post = inference.postprocess
    return {
        "run": ", ".join(str(Path(run.run_dir).resolve()) for run in runs),
        "checkpoint": runs[0].checkpoint.name,
        "tta": bool(inference.tta),
        "postprocessing": None if post is None else _described(post),
    }


def _described(post: PostProcess) -> list[str] | str:
    return (
        post.describe()
        if isinstance(post, Postprocessor)
        else getattr(post, "__name__", repr(post))
    )


def _predictions(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if PREDICTION_RE.match(p.name)) if out.is_dir() else []


def claim_folder(out: Path, mine: dict, overwrite: bool) -> None:
    """Make `out` this run's folder of predictions, or refuse: it holds another run's (or
    predictions of unknown origin). With `overwrite` the old predictions are removed."""
    record = out / PROVENANCE
    theirs = None
    if record.is_file():
        try:
            theirs = json.loads(record.read_text())
        except (ValueError, UnicodeDecodeError):
            theirs = {"run": f"unknown (unreadable {PROVENANCE})"}
    old = _predictions(out)
    foreign = (theirs is not None and theirs != mine) or (theirs is None and old)
    if foreign and not overwrite:
        if theirs is None:
            who = f"{len(old)} predictions of unknown origin (no {PROVENANCE})"
        else:
            diff = ", ".join(f"{k} {theirs.get(k)!r}" for k in mine if theirs.get(k) != mine[k])
            who = f"the predictions of another model ({diff})"
        raise KitsError(
            f"--out {out} holds {who}; predicting {mine['run']} ({mine['checkpoint']}) "
            "there would mix two models. Choose another --out, or pass --overwrite to "
            "replace them"
        )
    if foreign:
        for p in old:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(mine, indent=2, sort_keys=True))
