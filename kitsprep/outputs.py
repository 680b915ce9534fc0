"""The one check every command that writes runs on its output paths, before any work: an
output never replaces an input. Refused, in one line: the file being read (the store a
score reads), a path inside a source folder (a KiTS data folder or a case folder), a path
inside a run directory other than the one being written, and the files that make up the
run being written (its config, split, metrics log, checkpoints)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kitsprep.cases import CASE_RE, IMAGING_NAMES
from kitsprep.errors import KitsError
from kitsprep.files import check_output_folder
from kitsprep.layouts.nnunet import is_nnunet_dataset

__all__ = ["RUN_FILES", "check_output", "enclosing_run", "enclosing_source"]

# A kitstrain run directory, as `kitstrain.core.rundir` lays it out (kitsprep cannot import
# kitstrain; a test checks that both name the same files): config.json with split.json or
# checkpoints/ beside it marks one, and these are its own files.
RUN_CONFIG, RUN_SPLIT, RUN_CHECKPOINTS = "config.json", "split.json", "checkpoints"
RUN_FILES = (RUN_CONFIG, RUN_SPLIT, "metrics.jsonl", "oom.json", "lock", "score.csv")
RUN_FOLDERS = (RUN_CHECKPOINTS, "tensorboard")


def is_run_dir(folder: Path) -> bool:
    return (folder / RUN_CONFIG).is_file() and (
        (folder / RUN_SPLIT).is_file() or (folder / RUN_CHECKPOINTS).is_dir()
    )


def is_source_dir(folder: Path) -> bool:
    """A case folder (it holds imaging.nii.gz), a KiTS data folder (case_XXXXX/ in it) or
    an nnU-Net raw dataset (dataset.json in it)."""
    if any((folder / n).exists() for n in IMAGING_NAMES) or is_nnunet_dataset(folder):
        return True
    try:
        return any(CASE_RE.match(p.name) and p.is_dir() for p in folder.iterdir())
    except OSError:
        return False


def _self_and_parents(path: Path) -> Iterable[Path]:
    yield path
    yield from path.parents


def enclosing_run(path: Path | str) -> Path | None:
    """The run directory `path` is in (or is), if any."""
    for folder in _self_and_parents(Path(path).resolve()):
        if folder.is_dir() and is_run_dir(folder):
            return folder
    return None


def enclosing_source(path: Path | str) -> Path | None:
    """The source folder (KiTS data folder or case folder) `path` is in (or is), if any."""
    for folder in _self_and_parents(Path(path).resolve()):
        if folder.is_dir() and is_source_dir(folder):
            return folder
    return None


def check_output(
    out: Path | str,
    option: str,
    *,
    reading: Iterable[Path | str | None] = (),
    run: Path | str | None = None,
) -> None:
    """Refuse `out` (the value of `option`) where writing it would replace an input:
    one of the files or folders `reading`, a path inside a source folder, inside a run
    directory other than `run` (the one this command writes), or one of `run`'s own files.
    Then the folder checks of `files.check_output_folder`."""
    out_r = Path(out).resolve()
    for src in reading:
        if src is None:
            continue
        src_r = Path(src).resolve()
        if out_r == src_r or (src_r.is_dir() and src_r in out_r.parents):
            where = "would overwrite" if out_r == src_r else "is inside"
            raise KitsError(
                f"{option} {out} {where} {src}, which this command reads; choose another {option}"
            )
    source = enclosing_source(out_r)
    if source is not None:
        raise KitsError(
            f"{option} {out} is inside the source folder {source}; write outputs "
            f"outside the data (e.g. {option} {source.parent.name or '.'}/outputs)"
        )
    run_r = Path(run).resolve() if run is not None else None
    found = enclosing_run(out_r)
    if found is not None and found != run_r:
        raise KitsError(
            f"{option} {out} is inside the run directory {found}, whose files it could "
            f"replace; choose another {option} outside it"
        )
    if run_r is not None and run_r in (out_r, *out_r.parents):
        rel = out_r.relative_to(run_r).parts
        if not rel or rel[0] in RUN_FILES or rel[0] in RUN_FOLDERS:
            raise KitsError(
                f"{option} {out} is "
                + ("the run directory itself" if not rel else f"the run's own {rel[0]}")
                + f"; choose another {option} (e.g. {run_r.name}/report.json)"
            )
    check_output_folder(out, option)
