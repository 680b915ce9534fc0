"""The end of a build: decide the store's edition, save the undo journal, let the single
writer (`store.finalize`) write labels, attributes and index from the commit records, and
rename the finished store onto OUT (so a file at OUT is always complete). A kill or a full
disk anywhere in here is redone by `--resume` from the journal (`store.journal`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from kitsprep import failpoints
from kitsprep.build.case import present_values
from kitsprep.build.config import BuildConfig
from kitsprep.cases import CaseRef, folder_edition, recorded_splits
from kitsprep.files import fsync_path
from kitsprep.labels import EDITIONS, LabelSet
from kitsprep.store.format import CaseWritten
from kitsprep.store.journal import reserve, save_journal, unreserve
from kitsprep.store.write import finalize, index_nbytes

JOURNAL = "finalize.journal"  # in OUT.partial, beside the store
# OUT.partial without its store but with the journal: the store was renamed onto OUT and
# only the clean-up was left (`run.finished_earlier`)
FINISHED_MARK = JOURNAL


def decide_labels(
    requested: str, written: list[CaseWritten], folder: tuple[str, str] | None = None
) -> tuple[LabelSet, str]:
    """The store's label set, and why: the requested edition; under ``auto`` the edition the
    source folder declares (`cases.folder_edition`), else KiTS23 when any mask holds a label
    only KiTS21/23 have (a cyst), else KiTS19."""
    if requested != "auto":
        return EDITIONS[requested], "--edition"
    if folder is not None:
        return EDITIONS[folder[0]], folder[1]
    kits19 = EDITIONS["kits19"]
    for w in written:
        if w.label_chunks is not None and kits19.unknown_values(
            present_values(w.counts, w.max_label)
        ):
            return EDITIONS["kits23"], f"{w.meta.case_id} holds a cyst label"
    return kits19, "no mask holds a label beyond kidney and tumour"


def finish_build(
    cfg: BuildConfig,
    refs: list[CaseRef],
    store: Path,
    written: list[CaseWritten],
    bad: dict[str, str],
    offsets: dict[str, np.ndarray],
) -> tuple[LabelSet, str]:
    """Finalize the partial build's store and move it onto ``cfg.out``; returns the store's
    label set and why it was chosen."""
    labels, why = decide_labels(cfg.edition, written, folder_edition(cfg.src, refs))
    chunk_bytes = cfg.size * cfg.size * 2
    save_journal(
        store, store.parent / JOURNAL, [offsets[w.meta.case_id] for w in written], chunk_bytes
    )
    # What finalize appends: label chunks, their chunk indexes, the index, attributes
    label_bytes = sum(len(c) for w in written for c in (w.label_chunks or []))
    slices = sum(w.meta.slices for w in written)
    reserve(store, 2 * label_bytes + 2 * index_nbytes(labels, slices) + 128 * slices + (4 << 20))
    splits = recorded_splits(cfg.src, [w.meta.case_id for w in written])
    finalize(store, written, bad, labels, why, splits)
    unreserve(store)
    # Not `atomic_path`: the store was built in OUT.partial, where --resume finds it.
    fsync_path(store)
    os.replace(store, cfg.out)
    failpoints.hit(f"rename {cfg.out.name}")
    fsync_path(cfg.out.parent)
    remove_partial(store.parent)
    return labels, why


def remove_partial(work: Path) -> None:
    """Remove OUT.partial, its journal last: while the journal is there, a --resume knows
    the store it renamed onto OUT is complete."""
    for p in work.iterdir():
        if p.name != JOURNAL:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    failpoints.hit("remove partial build")
    (work / JOURNAL).unlink(missing_ok=True)
    work.rmdir()
