"""Cross-validation folds: nnU-Net's protocol, every labelled patient validated once by the
model that did not see it. Folds are lists in nnU-Net's `splits_final.json` form (one
`{"train": [case ids], "val": [case ids]}` per fold); this module makes them (stratified by
tumour size), checks a given list against a store and picks one fold. Pure: reading and
writing the file is `kitstrain.data.foldsfile`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

from kitsprep.errors import KitsError
from kitsprep.store import StoreInfo
from kitstrain.data.splits import Split, require_labelled_cases, shown_cases

__all__ = [
    "DEFAULT_FOLDS",
    "check_folds",
    "fold_split",
    "splits_digest",
    "stratified_folds",
    "tumour_sizes",
]

DEFAULT_FOLDS = 5
FOLD_MODE = "fold"  # a `Split`'s mode when it is one fold of a cross-validation


def stratified_folds(sizes: Mapping[str, int], folds: int, seed: int = 0) -> list[dict]:
    """Deal cases into `folds` folds so that each gets its share of every tumour size:
    cases sorted by tumour size (then id) form strata of `folds` consecutive cases, and each
    stratum goes one case per fold to a seeded shuffle of the folds. Fold sizes differ by at
    most one; the same sizes and seed give the same folds."""
    cases = sorted(sizes, key=lambda c: (sizes[c], c))
    if folds < 2:
        raise KitsError(f"--folds must be at least 2, found {folds}; e.g. --folds 5")
    if len(cases) < folds:
        raise KitsError(
            f"{folds} folds need at least {folds} labelled cases, found {len(cases)}; "
            f"lower --folds to {max(2, len(cases))} or build the store from more cases"
        )
    rng = np.random.default_rng(seed)
    val: list[list[str]] = [[] for _ in range(folds)]
    for start in range(0, len(cases), folds):
        stratum = cases[start : start + folds]
        order = rng.permutation(folds)
        if len(stratum) < folds:  # the last, partial stratum: to the smallest folds first
            order = sorted(order, key=lambda k: len(val[k]))
        for case, k in zip(stratum, order, strict=False):
            val[int(k)].append(case)
    return [{"train": sorted(set(cases) - set(v)), "val": sorted(v)} for v in val]


def tumour_sizes(info: StoreInfo) -> dict[str, int]:
    """Tumour pixels per labelled case, from the store's index (no slice is read)."""
    return {c: int(info.label_pixels("tumour", info.rows(c)).sum()) for c in info.labelled_cases}


def check_folds(splits: object, info: StoreInfo, source: str) -> list[dict]:
    """`splits` (an nnU-Net `splits_final.json` list, ours, or a store's recorded one, from
    `source`) as a list of `{"train", "val"}` case-id lists, every case in the store and
    labelled, no fold validating a case it trains on. One line naming the problem else."""
    fix = f"fix {source} or pass another --splits"
    if not isinstance(splits, list) or not splits:
        raise KitsError(
            f"{source} holds {type(splits).__name__}, expected a non-empty list of "
            '{"train": [...], "val": [...]} (nnU-Net splits_final.json); ' + fix
        )
    out = []
    for k, fold in enumerate(splits):
        sides = fold if isinstance(fold, dict) else {}
        ok = all(
            isinstance(sides.get(s), list) and all(isinstance(c, str) for c in sides[s])
            for s in ("train", "val")
        )
        if not ok:
            raise KitsError(
                f"{source}: fold {k} is {str(fold)[:80]}, expected "
                '{"train": [case ids], "val": [case ids]}; ' + fix
            )
        out.append({"train": list(sides["train"]), "val": list(sides["val"])})
    named = sorted({c for fold in out for s in ("train", "val") for c in fold[s]})
    require_labelled_cases(
        info,
        named,
        what=f"{source} names case(s)",
        fix=fix,
        unlabelled_fix=f"folds hold labelled cases only, {fix}",
    )
    for k, fold in enumerate(out):
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            raise KitsError(
                f"{source}: fold {k} trains and validates on {shown_cases(both)}; a patient "
                f"must be on one side only, {fix}"
            )
    return out


def fold_split(splits: list[dict], fold: int, source: str, seed: int) -> Split:
    """Fold `fold` of checked `splits` (`check_folds`) as a run's `Split`."""
    if not 0 <= fold < len(splits):
        raise KitsError(
            f"--fold {fold} is outside the {len(splits)} folds of {source}; expected "
            f"0..{len(splits) - 1}"
        )
    chosen = splits[fold]
    for side in ("train", "val"):
        if not chosen[side]:
            raise KitsError(
                f"{source}: fold {fold} has no {side} case; expected at least one, fix "
                f"{source} or pass another --splits"
            )
    return Split(tuple(sorted(chosen["train"])), tuple(sorted(chosen["val"])), FOLD_MODE, seed)


def splits_digest(splits: list[dict]) -> str:
    """sha256 of the folds' content (canonical JSON): the same folds however the file is
    laid out, another digest for any other assignment."""
    text = json.dumps(splits, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
