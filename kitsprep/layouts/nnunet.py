"""An nnU-Net raw dataset as a source (KiTS23's is ``Dataset220_KiTS2023``): ``dataset.json``,
``imagesTr/NAME_0000.nii.gz`` with ``labelsTr/NAME.nii.gz``, and ``imagesTs/NAME_0000.nii.gz``
as unlabelled cases. The labels ``dataset.json`` declares must be a KiTS edition's: nnU-Net
v2's ``{"background": 0, "kidney": 1, ...}``, its region form (``"kidney": [1, 2, 3]`` with
``regions_class_order``), or v1's ``{"0": "background", ...}``; the edition is read from them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from kitsprep.caseref import CaseRef
from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS, LabelSet

DATASET_JSON = "dataset.json"
NIFTI_ENDINGS = (".nii.gz", ".nii")
TEST_REASON = "in imagesTs (nnU-Net's unlabelled test images)"

__all__ = [
    "DATASET_JSON",
    "DatasetLabels",
    "dataset_edition",
    "is_nnunet_dataset",
    "label_differences",
    "nnunet_cases",
    "parse_labels",
]


@dataclass(frozen=True)
class DatasetLabels:
    """What ``dataset.json`` declares: foreground label value -> name, and in the region
    form the regions as (name, label values, value written back), in write-back order."""

    labels: dict[int, str]
    regions: tuple[tuple[str, tuple[int, ...], int], ...] | None = None


def is_nnunet_dataset(src: Path) -> bool:
    """A folder holding ``dataset.json``: an nnU-Net raw dataset."""
    return Path(src).is_dir() and (Path(src) / DATASET_JSON).is_file()


def _plain(name: str) -> str:
    """A label name as compared with an edition's: case, spelling and plural set aside
    (nnU-Net's ``Tumor``, ``tumor``, KiTS19's ``tumour``, ``cysts``)."""
    word = re.sub(r"[^a-z]", "", name.lower()).replace("tumor", "tumour")
    return word[:-1] if word.endswith("s") else word


def _value(v: object, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise KitsError(f"{where}: expected an integer label value, found {v!r}; fix dataset.json")
    return v


def parse_labels(labels: object, order: object, where: str) -> DatasetLabels:
    """``dataset.json``'s ``labels`` (and ``regions_class_order``) as `DatasetLabels`."""
    if not isinstance(labels, dict) or not labels:
        raise KitsError(
            f"{where}: 'labels' is {labels!r}; expected a mapping such as "
            '{"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}'
        )
    if all(isinstance(k, str) and k.strip().isdigit() for k in labels):  # v1: value -> name
        named = {int(k): str(v) for k, v in labels.items()}
        return DatasetLabels({v: n for v, n in sorted(named.items()) if v != 0})
    if not any(isinstance(v, list) for v in labels.values()):  # v2: name -> value
        values = {_value(v, f"{where}: label {n!r}"): str(n) for n, v in labels.items()}
        return DatasetLabels({v: n for v, n in sorted(values.items()) if v != 0})
    regions = []
    for n, v in labels.items():
        members = v if isinstance(v, list) else [v]
        if members != [0]:  # background
            regions.append(
                (str(n), tuple(sorted(_value(x, f"{where}: region {n!r}") for x in members)))
            )
    if not isinstance(order, list) or len(order) != len(regions):
        raise KitsError(
            f"{where}: labels are regions (lists of values), so regions_class_order must "
            f"list the value each of the {len(regions)} regions writes back; found {order!r}. "
            "Add it as nnU-Net does (KiTS23: [1, 3, 2])"
        )
    writes = [_value(v, f"{where}: regions_class_order") for v in order]
    values = sorted({v for _, vs in regions for v in vs})
    return DatasetLabels(
        {v: "" for v in values},
        tuple((n, vs, w) for (n, vs), w in zip(regions, writes, strict=True)),
    )


def label_differences(ds: DatasetLabels, ls: LabelSet) -> list[str]:
    """How the declared labels differ from edition ``ls``'s, one phrase each (none: they agree)."""
    want = dict((v, n) for n, v in ls.labels)
    out = []
    for v in sorted(set(want) | set(ds.labels)):
        if v not in want:
            out.append(f"label {v} ({ds.labels[v] or 'in a region'}) is not one of {ls.edition}'s")
        elif v not in ds.labels:
            out.append(f"label {v} ({want[v]}) of {ls.edition} is missing")
        elif ds.regions is None and _plain(ds.labels[v]) != _plain(want[v]):
            out.append(f"label {v} is {ds.labels[v]!r} where {ls.edition} has {v} = {want[v]}")
    if ds.regions is not None and not out:
        mine = [(vs, w) for _, vs, w in ds.regions]
        theirs = [(r.labels, r.writes) for r in ls.regions]
        if mine != theirs:
            shown = ", ".join(f"{n} {list(vs)} writes {w}" for n, vs, w in ds.regions)
            expect = ", ".join(f"{r.name} {list(r.labels)} writes {r.writes}" for r in ls.regions)
            out.append(f"regions ({shown}) differ from {ls.edition}'s, in order: {expect}")
    return out


def _read_json(root: Path) -> dict:
    path = root / DATASET_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KitsError(
            f"{path} cannot be read as JSON ({exc}); restore the nnU-Net dataset.json"
        ) from None
    if not isinstance(meta, dict):
        raise KitsError(f"{path} holds {type(meta).__name__}; expected nnU-Net's dataset.json")
    return meta


def dataset_labels(root: Path) -> DatasetLabels:
    """The labels ``root/dataset.json`` declares; a missing field is one line naming it."""
    meta = _read_json(root)
    where = str(root / DATASET_JSON)
    if "labels" not in meta:
        raise KitsError(
            f"{where} has no 'labels'; add nnU-Net's field, e.g. "
            '"labels": {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}'
        )
    return parse_labels(meta["labels"], meta.get("regions_class_order"), where)


def dataset_edition(root: Path, requested: str = "auto") -> tuple[str, str]:
    """The KiTS edition whose labels ``dataset.json`` declares, and why; with ``requested``
    (an edition) that one, once its labels agree. KiTS21 and KiTS23 share their labels: the
    dataset's name tells them apart, else KiTS23. Disagreeing labels are one line naming the
    first difference from the nearest edition."""
    ds = dataset_labels(root)
    diffs = {name: label_differences(ds, ls) for name, ls in EDITIONS.items()}
    where = root / DATASET_JSON
    if requested != "auto":
        if diffs[requested]:
            raise KitsError(
                f"{where}: {diffs[requested][0]}, so it is not --edition {requested}; "
                "choose the edition its masks hold, or fix its labels"
            )
        return requested, "--edition"
    agree = [name for name, d in diffs.items() if not d]
    if not agree:
        nearest = min(reversed(diffs), key=lambda n: len(diffs[n]))
        raise KitsError(
            f"{where}: {diffs[nearest][0]}, so its labels are no KiTS edition's (nearest "
            f"{nearest}: 0 background, "
            + ", ".join(f"{v} {n}" for n, v in EDITIONS[nearest].labels)
            + "); fix dataset.json's labels, or relabel the masks"
        )
    # the folder or the dataset's name (Dataset220_KiTS2023, "KiTS2021") names the edition
    names = f"{root.name} {_read_json(root).get('name', '')}".lower()
    named = re.sub(r"kits20(\d\d)", r"kits\1", names)
    chosen = next((n for n in agree if n in named), agree[-1])
    return chosen, f"labels in {where}"


def _images(folder: Path, ending: str) -> dict[str, Path]:
    """NAME -> ``folder/NAME_0000<ending>``; a second channel's file is one line."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(ending):
            continue
        stem = p.name[: -len(ending)]
        m = re.fullmatch(r"(.+)_(\d{4})", stem)
        if m is None:
            raise KitsError(
                f"{p}: expected nnU-Net's image name NAME_0000{ending}; rename it, or move "
                "it out of the dataset"
            )
        if m.group(2) != "0000":
            raise KitsError(
                f"{p} is channel {int(m.group(2))} of {m.group(1)}; kitsprep reads one CT "
                "channel (_0000): remove the other channels' files"
            )
        out[m.group(1)] = p
    return out


def nnunet_cases(root: Path) -> list[CaseRef]:
    """Every case of the dataset at ``root``, by name: imagesTr with its labelsTr mask, then
    imagesTs unlabelled. ``dataset.json`` is checked first (fields, one channel, labels)."""
    meta = _read_json(root)
    where = root / DATASET_JSON
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise KitsError(
            f"{where} has no 'channel_names' (nnU-Net v2) or 'modality' (v1); add "
            '"channel_names": {"0": "CT"}'
        )
    if len(channels) > 1:
        raise KitsError(
            f"{where} declares {len(channels)} channels "
            f"({', '.join(map(str, channels.values()))}); kitsprep reads one CT channel: "
            "make a dataset of channel 0 only"
        )
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise KitsError(
            f"{where} has file_ending {ending!r}; kitsprep reads NIfTI "
            f"({', '.join(NIFTI_ENDINGS)}): convert the images and labels"
        )
    dataset_edition(root)
    train_dir, label_dir, test_dir = root / "imagesTr", root / "labelsTr", root / "imagesTs"
    if not train_dir.is_dir() and not test_dir.is_dir():
        raise KitsError(f"{root} has dataset.json but no imagesTr/ folder; add the images")
    train = _images(train_dir, ending) if train_dir.is_dir() else {}
    masks = (
        {p.name[: -len(ending)]: p for p in label_dir.iterdir() if p.name.endswith(ending)}
        if label_dir.is_dir()
        else {}
    )
    refs = []
    for name, image in train.items():
        if name not in masks:
            raise KitsError(
                f"{image} has no label {label_dir / (name + ending)}; add the mask, or move "
                "the image to imagesTs/ to build it as an unlabelled case"
            )
        refs.append(CaseRef(name, image, masks[name]))
    orphans = sorted(set(masks) - set(train))
    if orphans:
        raise KitsError(
            f"{label_dir / (orphans[0] + ending)} has no image "
            f"{train_dir / (orphans[0] + '_0000' + ending)}"
            + (f" (and {len(orphans) - 1} more labels)" if len(orphans) > 1 else "")
            + "; add the image, or remove the label"
        )
    test = _images(test_dir, ending) if test_dir.is_dir() else {}
    both = sorted(set(test) & set(train))
    if both:
        raise KitsError(f"{both[0]} is in both imagesTr/ and imagesTs/ of {root}; keep one of them")
    refs += [CaseRef(name, image, None, TEST_REASON) for name, image in test.items()]
    if not refs:
        raise KitsError(f"{root}: imagesTr/ and imagesTs/ hold no NAME_0000{ending} images")
    return sorted(refs, key=lambda r: r.case_id)
