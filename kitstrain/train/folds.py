"""Which folds a `fit --fold K` trains from: `--splits FILE`, else the folds the store
records, else `splits.json` beside the run (in its parent folder: the runs of one
cross-validation share it), written there once from the store's tumour sizes and then
read by every fold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kitsprep.errors import KitsError
from kitsprep.store import StoreInfo
from kitstrain.core.cvdir import SPLITS
from kitstrain.core.record import FoldRecord
from kitstrain.data.folds import (
    DEFAULT_FOLDS,
    check_folds,
    fold_split,
    splits_digest,
    stratified_folds,
    tumour_sizes,
)
from kitstrain.data.foldsfile import read_splits_file, write_splits_file
from kitstrain.data.splits import Split


@dataclass(frozen=True)
class Folds:
    """Checked folds and where they came from (a path, or the store's record)."""

    splits: list[dict]
    source: str  # as messages name it
    path: Path | None = None  # the file; None: the store's record

    def record(self, fold: int) -> FoldRecord:
        where = self.source if self.path is None else str(self.path.resolve())
        return FoldRecord(fold, len(self.splits), where, splits_digest(self.splits))

    def split(self, fold: int | None, seed: int) -> Split | None:
        """Fold `fold` as a run's split (None for None); a fold outside them is an error."""
        return None if fold is None else fold_split(self.splits, fold, self.source, seed)


def resolve_folds(
    info: StoreInfo,
    folds: int | None,
    splits_file: Path | None,
    default_file: Path,
    seed: int,
    *,
    recorded: list[dict] | None = None,
    fold: int | None = None,
    write: bool = True,
    echo: Callable[[str], None] = lambda s: None,
) -> Folds:
    """The folds, checked against the store: `splits_file`, else `recorded` (a store's own
    list), else `default_file` if it exists, else new stratified folds written there (only
    where `write`: one rank writes, the others compute the same). `folds` (None: the
    source's count, or 5 for new folds) must match the source's count; `fold`, if given,
    must be one of them (checked before anything is written)."""
    if splits_file is not None or recorded is not None or default_file.is_file():
        path = splits_file if splits_file is not None or recorded is not None else default_file
        raw = recorded if path is None else read_splits_file(path)
        source = f"the folds recorded in {info.path}" if path is None else str(path)
        splits = check_folds(raw, info, source)
        if folds is not None and folds != len(splits):
            raise KitsError(
                f"--folds {folds}, but {source} holds {len(splits)} folds; drop --folds, or "
                f"pass --splits with a file of {folds} folds"
            )
        found = Folds(splits, source, path)
        found.split(fold, seed)
        echo(f"folds: read {len(splits)} folds from {source}")
        return found
    n = DEFAULT_FOLDS if folds is None else folds
    splits = stratified_folds(tumour_sizes(info), n, seed)
    found = Folds(splits, str(default_file), default_file)
    found.split(fold, seed)
    if write:
        default_file.parent.mkdir(parents=True, exist_ok=True)
        write_splits_file(default_file, found.splits)
    echo(
        f"folds: wrote {n} folds of {len(info.labelled_cases)} labelled cases, stratified by "
        f"tumour size, to {default_file}"
    )
    return found


def store_folds(info: StoreInfo) -> list[dict] | None:
    """The folds a store records (`StoreInfo.splits`, from a MONAI datalist with folds), or
    None: a store without the attribute records none."""
    return info.splits


def resolve_fold_split(
    info: StoreInfo,
    fold: int,
    folds: int | None,
    splits_file: Path | None,
    run_dir: Path,
    seed: int,
    *,
    write: bool = True,
    echo: Callable[[str], None] = lambda s: None,
) -> tuple[Split, FoldRecord]:
    """Fold `fold`'s split and the record config.json keeps of it; without a splits file
    the folds are `splits.json` in the run's parent folder."""
    found = resolve_folds(
        info,
        folds,
        splits_file,
        Path(run_dir).parent / SPLITS,
        seed,
        recorded=store_folds(info),
        fold=fold,
        write=write,
        echo=echo,
    )
    return found.split(fold, seed), found.record(fold)
