"""Patient-level train/validation splits: a patient is never on both sides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kitsprep.cases import parse_case_spec
from kitsprep.errors import KitsError
from kitsprep.store import StoreInfo


@dataclass(frozen=True)
class Split:
    """Patient-level train/validation case lists and how they were chosen."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    # "explicit" (--train-cases/--val-cases), "seeded" (default split) or "fold" (`folds`)
    mode: str
    seed: int

    def to_json(self) -> dict:
        return {
            "train": list(self.train),
            "val": list(self.val),
            "mode": self.mode,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, d: dict) -> Split:
        for side in ("train", "val"):
            ids = d[side]
            if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
                raise ValueError(f"{side} is {ids!r}, expected a list of case ids")
        return cls(
            train=tuple(d["train"]), val=tuple(d["val"]), mode=str(d["mode"]), seed=int(d["seed"])
        )


def shown_cases(ids: Sequence[str]) -> str:
    return ", ".join(ids[:5]) + (f" ... ({len(ids)} cases)" if len(ids) > 5 else "")


def require_labelled_cases(
    info: StoreInfo, cases: Sequence[str], *, what: str, fix: str, unlabelled_fix: str
) -> None:
    """Every case is in the store and has a segmentation; else one line naming them. A
    string where the list belongs is refused as such (not read letter by letter)."""
    if isinstance(cases, (str, bytes)) or not all(isinstance(c, str) for c in cases):
        raise KitsError(
            f"{what}: expected a list of case ids like ['case_00000'], found {cases!r}; pass a list"
        )
    absent = [c for c in cases if c not in info.cases]
    if absent:
        raise KitsError(
            f"{what} {shown_cases(absent)} are not in {info.path}; expected cases of this "
            f"store, {fix}"
        )
    unlabelled = [c for c in cases if not info.cases[c].labelled]
    if unlabelled:
        raise KitsError(
            f"{what} {shown_cases(unlabelled)} have no segmentation (unlabelled test "
            f"cases); {unlabelled_fix}"
        )


def check_split(split: Split, info: StoreInfo) -> None:
    """Fail loudly unless both sides are non-empty, disjoint, present and labelled: a case in
    both would leak into its own validation score; an unlabelled one has nothing to learn."""
    both = sorted(set(split.train) & set(split.val))
    if both:
        raise KitsError(
            f"{len(both)} case(s) are in both the training and the validation "
            f"split: {shown_cases(both)}; a patient must be in only one, fix "
            "--train-cases/--val-cases"
        )
    for side, ids in (("training", split.train), ("validation", split.val)):
        if not ids:
            raise KitsError(
                f"the {side} split is empty; expected at least one labelled "
                "case, fix --train-cases/--val-cases"
            )
        require_labelled_cases(
            info,
            ids,
            what=f"{side} case(s)",
            fix="fix the case list or the store",
            unlabelled_fix="leave them out of --train-cases/--val-cases",
        )


def make_split(
    info: StoreInfo,
    train_spec: str | None,
    val_spec: str | None,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> Split:
    """Explicit case lists when given (one side alone: the other is the rest of the labelled
    cases), else a seeded ~80/20 shuffle of the labelled cases. Unlabelled cases never
    enter either side."""
    labelled = sorted(info.labelled_cases)
    if train_spec is None and val_spec is None:
        if len(labelled) < 2:
            raise KitsError(
                f"{info.path} holds {len(labelled)} labelled case(s); a "
                "train/validation split needs at least 2, build the store from "
                "more cases"
            )
        if not 0.0 < val_fraction < 1.0:
            raise KitsError(f"validation fraction must be in (0, 1), found {val_fraction}")
        n_val = min(max(1, round(len(labelled) * val_fraction)), len(labelled) - 1)
        order = np.random.default_rng(seed).permutation(len(labelled))
        val = sorted(labelled[i] for i in order[:n_val])
        train = sorted(labelled[i] for i in order[n_val:])
        split = Split(tuple(train), tuple(val), "seeded", int(seed))
    else:
        train = parse_case_spec(train_spec, info.case_ids) if train_spec is not None else None
        val = parse_case_spec(val_spec, info.case_ids) if val_spec is not None else None
        named = set(train or []) | set(val or [])
        unlabelled = sorted(c for c in named if not info.cases[c].labelled)
        if unlabelled:
            raise KitsError(
                f"case(s) {shown_cases(unlabelled)} have no segmentation (unlabelled "
                "test cases) and cannot be trained or validated on; leave them "
                "out of --train-cases/--val-cases"
            )
        if train is None:
            train = [c for c in labelled if c not in set(val)]
        if val is None:
            val = [c for c in labelled if c not in set(train)]
        split = Split(tuple(train), tuple(val), "explicit", int(seed))
    check_split(split, info)
    return split
