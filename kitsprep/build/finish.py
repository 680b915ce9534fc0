"""The end of a build: decide the store's edition, let the single writer
(`store.finalize`) write labels, attributes and index from the commit records, and
rename the finished store onto OUT (so a file at OUT is always complete)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kitsprep.build.case import present_values
from kitsprep.build.config import BuildConfig
from kitsprep.cases import CaseRef, folder_edition
from kitsprep.files import fsync_path
from kitsprep.labels import EDITIONS, LabelSet
from kitsprep.store.format import CaseWritten
from kitsprep.store.write import finalize


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
) -> tuple[LabelSet, str]:
    """Finalize the partial build's store and move it onto ``cfg.out``; returns the store's
    label set and why it was chosen."""
    labels, why = decide_labels(cfg.edition, written, folder_edition(cfg.src, refs))
    finalize(store, written, bad, labels, why)
    # Not `atomic_path`: the store was built in OUT.partial, where --resume finds it.
    fsync_path(store)
    os.replace(store, cfg.out)
    fsync_path(cfg.out.parent)
    shutil.rmtree(store.parent, ignore_errors=True)
    return labels, why
