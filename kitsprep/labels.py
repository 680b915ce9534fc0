"""The KiTS editions as data: label values, scored regions, write-back order, tolerances.

This is the only module that names a label value. Every stage reads a `LabelSet` from here
(``EDITIONS``) or from the store's ``labels`` attribute (``LabelSet.from_json``).

A region is a set of labels scored as one binary mask (KiTS19: kidney = {1, 2}, tumour = {2};
KiTS21/23's "hierarchical evaluation classes": kidney_and_mass = {1, 2, 3}, mass = {2, 3},
tumor = {2}). A region-based model predicts one binary mask per region; labels come back by
writing each region's ``writes`` label in region order, a later region overwriting an earlier
one (KiTS21/23: kidney, then cyst, then tumour; nnU-Net's ``regions_class_order``).

The label set owns both directions, so no later stage rebuilds them: labels -> regions as a
membership table (`LabelSet.region_table`, which the region losses gather their targets
from) and as masks (`region_mask`, `region_masks`: scoring, overlays); regions -> labels as
the write-back order (`LabelSet.write_order`, recorded with a region model so that a run
decodes without its store) and `decode_regions`. The torch twins in kitstrain (the region
targets of `kitstrain.model.losses`, `kitstrain.infer.engine.logits_to_labels`) read these
and are held to them by tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from kitsprep.caseref import CASE_RE
from kitsprep.errors import KitsError

__all__ = [
    "ANY_EDITION",
    "EDITIONS",
    "LabelSet",
    "Region",
    "any_edition_labels",
    "counted_values",
    "decode_regions",
    "edition",
    "region_mask",
    "region_masks",
    "write_back",
]


@dataclass(frozen=True)
class Region:
    """A scored region: the labels it unites, the label it writes back, its surface-Dice
    tolerance in mm (None where the edition scores Dice only)."""

    name: str
    labels: tuple[int, ...]
    writes: int
    tolerance_mm: float | None = None


@dataclass(frozen=True)
class LabelSet:
    """One KiTS edition's labels and regions. ``labels`` maps each foreground label's name to
    its value (background is 0 and unnamed); ``regions`` are in write-back order."""

    edition: str
    labels: tuple[tuple[str, int], ...]
    regions: tuple[Region, ...]
    prediction_name: str  # file name pattern of the edition's evaluator, e.g. "case_{:05d}.nii.gz"

    @property
    def names(self) -> tuple[str, ...]:
        """Foreground label names, in value order."""
        return tuple(n for n, _ in self.labels)

    @property
    def values(self) -> tuple[int, ...]:
        """Foreground label values, ascending."""
        return tuple(v for _, v in self.labels)

    @property
    def num_classes(self) -> int:
        """Classes of a softmax over labels, background included (max label + 1)."""
        return max(self.values) + 1

    @property
    def region_names(self) -> tuple[str, ...]:
        """Region names, in write-back order."""
        return tuple(r.name for r in self.regions)

    @property
    def write_order(self) -> tuple[int, ...]:
        """The label each region writes back, in write-back order (`Region.writes`): what a
        region model records so that its logits decode to labels (`write_back`)."""
        return tuple(r.writes for r in self.regions)

    def region_table(self, n_values: int | None = None) -> np.ndarray:
        """bool ``(n_values, regions)``: row v says which regions label value v belongs to
        (``n_values`` defaults to `num_classes`; rows past the edition's labels are all
        False). Indexing it with a label array gives every region's target in one gather:
        the region losses turn it into their lookup table."""
        n = self.num_classes if n_values is None else n_values
        if n < self.num_classes:
            raise ValueError(
                f"region_table: expected n_values >= {self.num_classes} (the values of "
                f"{self.edition}); found {n}"
            )
        table = np.zeros((n, len(self.regions)), bool)
        for k, r in enumerate(self.regions):
            table[list(r.labels), k] = True
        return table

    def value(self, name: str) -> int:
        """The value of a label by name; a one-line error lists the edition's names."""
        for n, v in self.labels:
            if n == name:
                return v
        raise KitsError(
            f"{self.edition} has no label named {name!r}; its labels are {', '.join(self.names)}"
        )

    def region(self, name: str) -> Region:
        """A region by name; a one-line error lists the edition's regions."""
        for r in self.regions:
            if r.name == name:
                return r
        raise KitsError(
            f"{self.edition} has no region named {name!r}; its regions are "
            f"{', '.join(self.region_names)}"
        )

    def unknown_values(self, present: np.ndarray | list[int]) -> list[int]:
        """Values among ``present`` that are neither background nor a label of the edition."""
        allowed = {0, *self.values}
        return sorted(int(v) for v in np.unique(np.asarray(present)) if int(v) not in allowed)

    def prediction_file(self, case_id: str) -> str:
        """The file name the edition's official evaluator expects for ``case_XXXXX``; a case
        named otherwise (an nnU-Net or MONAI source) keeps its name, as nnU-Net's are."""
        m = CASE_RE.match(case_id)
        return self.prediction_name.format(int(m.group(1))) if m else f"{case_id}.nii.gz"

    def to_json(self) -> str:
        """The label set as the store's ``labels`` attribute keeps it."""
        return json.dumps(
            {
                "edition": self.edition,
                "labels": [list(x) for x in self.labels],
                "regions": [
                    {
                        "name": r.name,
                        "labels": list(r.labels),
                        "writes": r.writes,
                        "tolerance_mm": r.tolerance_mm,
                    }
                    for r in self.regions
                ],
                "prediction_name": self.prediction_name,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> LabelSet:
        """The label set a store recorded (`to_json`)."""
        d = json.loads(text)
        return cls(
            edition=str(d["edition"]),
            labels=tuple((str(n), int(v)) for n, v in d["labels"]),
            regions=tuple(
                Region(
                    str(r["name"]),
                    tuple(int(v) for v in r["labels"]),
                    int(r["writes"]),
                    None if r["tolerance_mm"] is None else float(r["tolerance_mm"]),
                )
                for r in d["regions"]
            ),
            prediction_name=str(d["prediction_name"]),
        )


_KITS19 = LabelSet(
    edition="kits19",
    labels=(("kidney", 1), ("tumour", 2)),
    regions=(Region("kidney", (1, 2), writes=1), Region("tumour", (2,), writes=2)),
    prediction_name="prediction_{:05d}.nii.gz",
)


def _kits2x(name: str) -> LabelSet:
    # Tolerances and region order from the official evaluator (neheller/kits23,
    # kits23/configuration/labels.py: HEC_NAME_LIST, KITS_HEC_LABEL_MAPPING, HEC_SD_TOLERANCES_MM)
    return LabelSet(
        edition=name,
        labels=(("kidney", 1), ("tumour", 2), ("cyst", 3)),
        regions=(
            Region("kidney_and_mass", (1, 2, 3), writes=1, tolerance_mm=1.0330772532390826),
            Region("mass", (2, 3), writes=3, tolerance_mm=1.1328796488598762),
            Region("tumor", (2,), writes=2, tolerance_mm=1.1498198361434828),
        ),
        prediction_name="case_{:05d}.nii.gz",
    )


EDITIONS: dict[str, LabelSet] = {
    "kits19": _KITS19,
    "kits21": _kits2x("kits21"),
    "kits23": _kits2x("kits23"),
}


# How a message names the labels of every edition together (a value none of them has).
ANY_EDITION = "any KiTS edition"


def any_edition_labels() -> tuple[tuple[str, int], ...]:
    """Every foreground (name, value) some edition has, by value: what a mask may hold
    before its edition is known."""
    return tuple(sorted({lv for ls in EDITIONS.values() for lv in ls.labels}, key=lambda x: x[1]))


def counted_values(labels: tuple[tuple[str, int], ...] = ()) -> int:
    """How many label values (background included) a build or verify counts per slice: up to
    the largest of ``labels`` and of every edition, whatever the edition asked for, so a
    mask refused for holding another edition's label names each such value it holds."""
    return 1 + max(v for _, v in (*labels, *any_edition_labels()))


def edition(name: str) -> LabelSet:
    """The label set of a KiTS edition by name."""
    try:
        return EDITIONS[name]
    except KeyError:
        raise KitsError(
            f"unknown KiTS edition {name!r}; choose one of {', '.join(EDITIONS)}"
        ) from None


# --------------------------------------------------------------------------- pure arrays


def region_mask(labels: np.ndarray, ls: LabelSet, k: int) -> np.ndarray:
    """bool mask of region k (``labels ∈ ls.regions[k].labels``), shaped as ``labels``. One
    region at a time keeps a whole case's scoring at one mask per volume; any integer
    labels work, values outside the edition belong to no region."""
    return np.isin(labels, ls.regions[k].labels)


def region_masks(labels: np.ndarray, ls: LabelSet) -> np.ndarray:
    """bool ``(regions, *labels.shape)``: region k is ``labels ∈ ls.regions[k].labels``."""
    labels = np.asarray(labels)
    table = ls.region_table(max(ls.num_classes, int(labels.max(initial=0)) + 1))
    return table.T[:, labels]


def write_back(masks: np.ndarray, write_order: tuple[int, ...] | list[int]) -> np.ndarray:
    """uint8 labels from bool ``(regions, ...)`` masks: region k writes ``write_order[k]``,
    in order, so a later region overwrites an earlier one. ``write_order`` is a label set's
    `LabelSet.write_order`, or the one a run recorded."""
    masks = np.asarray(masks, bool)
    if masks.shape[0] != len(write_order):
        raise ValueError(f"expected {len(write_order)} region masks, found {masks.shape[0]}")
    out = np.zeros(masks.shape[1:], np.uint8)
    for k, value in enumerate(write_order):
        out[masks[k]] = value
    return out


def decode_regions(masks: np.ndarray, ls: LabelSet) -> np.ndarray:
    """uint8 labels from bool ``(regions, ...)`` masks, written in region order (a later region
    overwrites an earlier one): the inverse of `region_masks` on any labelling of the edition."""
    masks = np.asarray(masks, bool)
    if masks.shape[0] != len(ls.regions):
        raise ValueError(
            f"expected {len(ls.regions)} region masks for {ls.edition}, found {masks.shape[0]}"
        )
    return write_back(masks, ls.write_order)
