"""A MONAI datalist as a source: ``{"training": [{"image": ..., "label": ..., "fold": K}, ...],
"test": [...]}``, paths relative to the JSON's folder or absolute. Case ids come from the
image file names (``.nii.gz`` and nnU-Net's ``_0000`` stripped; KiTS's
``case_00000/imaging.nii.gz`` gives ``case_00000``). The folds become the store's recorded
split, in nnU-Net's ``splits_final.json`` form."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePath

from kitsprep.caseref import CaseRef
from kitsprep.errors import KitsError

TEST_REASON = "in the datalist's test list"
FILE_STEMS = ("imaging", "segmentation")  # KiTS's file names: the case is the folder

__all__ = ["case_id_of", "datalist_cases", "datalist_splits", "is_datalist"]


@dataclass(frozen=True)
class Entry:
    where: str  # e.g. "training[3]", for messages
    ref: CaseRef
    fold: int | None


def is_datalist(src: Path) -> bool:
    """A JSON file given as ``--src``: a MONAI datalist."""
    return Path(src).suffix.lower() == ".json" and not Path(src).is_dir()


def case_id_of(path: str) -> str:
    """The case id an image path gives: ``imagesTr/case_00000_0000.nii.gz`` and
    ``case_00000/imaging.nii.gz`` both give ``case_00000``."""
    p = PurePath(path)
    stem = p.name
    for ending in (".nii.gz", ".nii"):
        if stem.endswith(ending):
            stem = stem[: -len(ending)]
            break
    if stem in FILE_STEMS:
        return p.parent.name
    return stem[:-5] if stem.endswith("_0000") else stem


def _file(base: Path, value: object, where: str, key: str, datalist: Path) -> Path:
    """The existing NIfTI file an entry's ``image`` or ``label`` names."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, list):
        raise KitsError(
            f"{datalist}: {where} {key} lists {len(value)} files; kitsprep reads one CT "
            f"channel: give one {key} file per entry"
        )
    if not isinstance(value, str) or not value:
        raise KitsError(f"{datalist}: {where} {key} is {value!r}; expected a file path")
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.name.endswith((".nii.gz", ".nii")):
        raise KitsError(f"{datalist}: {where} {key} {value} is not NIfTI; convert it to .nii.gz")
    if not path.is_file():
        raise KitsError(
            f"{datalist}: {where} {key} {path} does not exist; fix the path (relative paths "
            "start at the datalist's folder), or remove the entry"
        )
    return path


def _entries(datalist: Path) -> list[Entry]:
    """Every entry of the datalist, checked: files there, one channel, unique case ids."""
    datalist = Path(datalist)
    if not datalist.is_file():
        raise KitsError(f"datalist {datalist} does not exist; pass a MONAI datalist JSON file")
    try:
        doc = json.loads(datalist.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KitsError(
            f"{datalist} cannot be read as JSON ({exc}); expected a MONAI datalist"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("training"), list):
        hint = (
            "; it looks like nnU-Net's dataset.json: pass its folder as --src"
            if isinstance(doc, dict) and ("channel_names" in doc or "modality" in doc)
            else ""
        )
        raise KitsError(
            f"{datalist} is not a MONAI datalist: expected a JSON object with a "
            f'"training" list of {{"image": ..., "label": ...}} entries{hint}'
        )
    base = datalist.parent
    entries: list[Entry] = []
    for part in ("training", "test"):
        items = doc.get(part) or []
        if not isinstance(items, list):
            raise KitsError(f'{datalist}: "{part}" is {type(items).__name__}; expected a list')
        for k, item in enumerate(items):
            where = f"{part}[{k}]"
            if isinstance(item, str) and part == "test":  # the Decathlon form: paths only
                item = {"image": item}
            if not isinstance(item, dict) or "image" not in item:
                raise KitsError(f'{datalist}: {where} is {item!r}; expected {{"image": ...}}')
            if part == "training" and "label" not in item:
                raise KitsError(
                    f"{datalist}: {where} has no label; give its mask, or list it under test"
                )
            image = _file(base, item["image"], where, "image", datalist)
            label = item.get("label")
            seg = None if label is None else _file(base, label, where, "label", datalist)
            fold = item.get("fold")
            if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int)):
                raise KitsError(f"{datalist}: {where} has fold {fold!r}; expected an integer")
            cid = case_id_of(str(image))
            ref = CaseRef(cid, image, seg, "" if seg else TEST_REASON)
            entries.append(Entry(where, ref, fold))
    seen: dict[str, str] = {}
    for e in entries:
        if e.ref.case_id in seen:
            raise KitsError(
                f"{datalist}: {seen[e.ref.case_id]} and {e.where} both give case id "
                f"{e.ref.case_id}; each case once, please: remove or rename one"
            )
        seen[e.ref.case_id] = e.where
    if not entries:
        raise KitsError(f"{datalist} lists no cases; add training entries")
    return entries


def datalist_cases(datalist: Path) -> list[CaseRef]:
    """The datalist's cases, sorted by id; test entries (without a label) are unlabelled."""
    return sorted((e.ref for e in _entries(datalist)), key=lambda r: r.case_id)


def datalist_splits(datalist: Path) -> list[dict] | None:
    """The training entries' folds in nnU-Net's ``splits_final.json`` form, folds sorted:
    fold K validates its entries and trains on every other training entry (those without a
    fold train in every fold). None when no entry has a fold."""
    train = [e for e in _entries(datalist) if e.where.startswith("training")]
    folds = sorted({e.fold for e in train if e.fold is not None})
    return [
        {
            "train": sorted(e.ref.case_id for e in train if e.fold != k),
            "val": sorted(e.ref.case_id for e in train if e.fold == k),
        }
        for k in folds
    ] or None
