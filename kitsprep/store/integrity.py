"""The cheap, whole-store checks: the root attributes against their checksum, and every
index column against the cases and the file (case and slice ranges, offsets and sizes
non-negative and inside the file, no two rows sharing a chunk). `open_store` runs them
once, so `fit` and `score` stop with one line instead of an OSError or a silent read of
the wrong slice; `kitsprep verify` lists them."""

from __future__ import annotations

import numpy as np

__all__ = ["index_problems"]


def index_problems(
    index: np.ndarray, cases: list[tuple[str, int, int, bool]], size: int, file_bytes: int
) -> list[str]:
    """What is wrong with `index`, given the cases (id, row_start, slices, labelled) in
    order, the slice side and the file's length; [] when nothing is."""
    problems: list[str] = []
    n = len(index)
    total = sum(c[2] for c in cases)
    if n != total:
        problems.append(f"index has {n} rows but the cases hold {total} slices")
    case = index["case"].astype(np.int64)
    if n and (case.min() < 0 or case.max() >= len(cases)):
        bad = int(np.flatnonzero((case < 0) | (case >= len(cases)))[0])
        problems.append(f"index row {bad} names case #{int(case[bad])}, which is not in the store")
    for pos, (cid, start, slices, labelled) in enumerate(cases):
        rows = index[start : start + slices]
        if start < 0 or start + slices > n:
            problems.append(f"{cid}: its rows {start}..{start + slices - 1} lie outside the index")
            continue
        if not (np.all(rows["case"] == pos) and np.array_equal(rows["slice"], np.arange(slices))):
            problems.append(f"{cid}: its index rows are not its slices 0..{slices - 1}")
        if labelled and (np.any(rows["label_offset"] < 0) or np.any(rows["label_nbytes"] <= 0)):
            problems.append(f"{cid}: a labelled slice's index row has no label chunk")
        if not labelled and np.any(rows["label_offset"] != -1):
            problems.append(f"{cid}: unlabelled, but its index rows point at label chunks")
    slice_bytes = size * size * 2
    img = index["image_offset"].astype(np.int64)
    if n and (img.min() < 0 or img.max() + slice_bytes > file_bytes):
        problems.append(
            f"an image offset lies outside the file (offsets {int(img.min())}..{int(img.max())}, "
            f"file {file_bytes} bytes)"
        )
    if len(np.unique(img)) != n:
        problems.append("two index rows point at the same image chunk")
    elif n > 1 and np.any(np.diff(np.sort(img)) < slice_bytes):
        problems.append("two index rows point at overlapping image chunks")
    lab = index["label_offset"].astype(np.int64)
    has = lab >= 0
    ends = lab[has] + index["label_nbytes"][has].astype(np.int64)
    if np.any(index["label_nbytes"] < 0) or (has.any() and ends.max() > file_bytes):
        problems.append("a label chunk's offset or size lies outside the file")
    if len(np.unique(lab[has])) != int(has.sum()):
        problems.append("two index rows point at the same label chunk")
    return problems
