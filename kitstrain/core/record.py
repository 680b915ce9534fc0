"""A run's record (`config.json`) as one typed, versioned dataclass, written and read here
only. Every room that reads a run (resume, score, predict, the API) gets a `RunRecord`,
never a dict by key, so a renamed field fails here, at once, with one line naming the file.

Versions: 1 is this layout with a `version` key; 0 is the same layout as kits wrote it
before the key existed, read as it is. A record from a newer kits is refused with the fix.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from kitsprep.errors import KitsError
from kitsprep.labels import LabelSet
from kitsprep.window import Window
from kitstrain.core import rundir
from kitstrain.core.config import TrainConfig

__all__ = [
    "RECORD_VERSION",
    "FoldRecord",
    "RunRecord",
    "StoreAttrs",
    "read_record",
    "write_record",
]

RECORD_VERSION = 1


@dataclass(frozen=True)
class StoreAttrs:
    """The preprocessing the run trained with, from its store: enough to predict when the
    store is gone."""

    window: Window | None = None
    size: int | None = None
    num_classes: int | None = None
    labels: LabelSet | None = None
    spacing: float | None = None  # in-plane mm per stored pixel (None: slices fitted whole)


@dataclass(frozen=True)
class FoldRecord:
    """The cross-validation fold a run trained (`fit --fold`): which one, of how many, and
    the folds it came from (a splits file, or the store's recorded list) with their digest
    (`kitstrain.data.folds.splits_digest`)."""

    fold: int
    folds: int
    splits: str
    sha256: str


@dataclass(frozen=True)
class RunRecord:
    """Every resolved option of a run, the store it trained on, and the environment."""

    train: TrainConfig
    model: dict[str, Any]  # the network's own config, typed by kitstrain.model
    store: str | None = None
    store_fingerprint: str | None = None
    store_attrs: StoreAttrs | None = None
    context: int = 0
    label_weights_applied: dict[str, float] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)  # the batch chosen, and why
    batch_size: int | None = None
    patch_size: int | None = None
    lr_scaling: dict[str, Any] = field(default_factory=dict)
    val_batch_size: int | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    device: str | None = None
    # the loader as resolved on the machine that started (or last resumed) the run
    workers: int | None = None  # --workers resolved ('auto': this rank's cores - 1)
    workers_reason: str = ""
    augment_side: str | None = None  # --augment-on resolved: 'device', 'workers', None (off)
    precision_reason: str = ""  # what --precision resolved to here, and why
    env: dict[str, Any] = field(default_factory=dict)
    fold: FoldRecord | None = None  # None: not a cross-validation fold
    # under --time-limit, what in-training validation covers (`train.budget.ValidationPlan`);
    # empty without a limit, and in records written before it existed
    validation: dict[str, Any] = field(default_factory=dict)
    version: int = RECORD_VERSION

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.store_attrs is not None:
            attrs = self.store_attrs
            out["store_attrs"] = {
                "window": None if attrs.window is None else json.loads(attrs.window.to_json()),
                "size": attrs.size,
                "num_classes": attrs.num_classes,
                "labels": None if attrs.labels is None else json.loads(attrs.labels.to_json()),
                "spacing": attrs.spacing,
            }
        return out


def write_record(run_dir: Path, record: RunRecord) -> None:
    """config.json, atomically."""
    rundir.write_json(Path(run_dir) / rundir.CONFIG, record.to_json())


def read_record(run_dir: Path) -> RunRecord:
    """config.json as a `RunRecord`: a missing, damaged, mistyped or newer file is one line
    naming the file and the fix."""
    raw = rundir.read_json(run_dir, rundir.CONFIG)
    path = Path(run_dir) / rundir.CONFIG
    if isinstance(raw.get("cascade"), dict):  # `core.cascade`'s record: two runs inside
        raise KitsError(
            f"{run_dir} is a cascade of two runs (`fit --cascade`); name a stage: "
            f"{Path(run_dir) / 'coarse'} or {Path(run_dir) / 'fine'}"
        )
    version = raw.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise KitsError(
            f"{path} has version {version!r}, not a run record version; restore the file "
            "`kitstrain fit` wrote, or start a new run"
        )
    if version > RECORD_VERSION:
        raise KitsError(
            f"{path} is run record version {version}, written by a newer kits; this kits "
            f"reads versions up to {RECORD_VERSION}: upgrade kits to use this run"
        )
    return rundir.from_record(run_dir, rundir.CONFIG, _parse, raw)


def _parse(raw: dict[str, Any]) -> RunRecord:
    values = dict(raw)
    values["version"] = RECORD_VERSION  # version 0 has this layout; read as it is
    attrs = values.get("store_attrs")
    if attrs is not None:
        _expect(attrs, dict, "store_attrs")
        values["store_attrs"] = StoreAttrs(
            window=None if attrs.get("window") is None else Window(**attrs["window"]),
            size=attrs.get("size"),
            num_classes=attrs.get("num_classes"),
            labels=(
                None
                if attrs.get("labels") is None
                else LabelSet.from_json(json.dumps(attrs["labels"]))
            ),
            spacing=attrs.get("spacing"),
        )
        _check_fields(values["store_attrs"], "store_attrs")
    if values.get("fold") is not None:
        _expect(values["fold"], dict, "fold")
        values["fold"] = FoldRecord(**values["fold"])
        _check_fields(values["fold"], "fold")
    _expect(values.get("train"), dict, "train")
    values["train"] = TrainConfig(**values["train"])
    _check_fields(values["train"], "train")
    record = RunRecord(**values)
    _check_fields(record, "")
    return record


def _check_fields(obj: Any, where: str) -> None:
    """Each field holds a value of its declared type (`"context": "two"` is refused)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        name = f"{where}.{f.name}" if where else f.name
        if is_dataclass(value) or isinstance(value, (Window, LabelSet)):
            continue
        if not _conforms(value, hints[f.name]):
            default = f.default if f.default is not MISSING else None
            raise ValueError(
                f"{name} is {value!r}, expected {_describe(hints[f.name])}"
                + (f" (e.g. {default!r})" if default is not None else "")
            )


def _expect(value: Any, kind: type, name: str) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"{name} is {value!r}, expected a JSON object")


def _conforms(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is dict or hint is dict:
        args = typing.get_args(hint)
        if not isinstance(value, dict):
            return False
        return not args or all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    return True  # a type this record does not check (a nested record is checked apart)


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is dict or hint is dict:
        return "a JSON object"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, str(hint)
    )
