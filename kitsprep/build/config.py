"""What a build is asked to do and what it reports: the options (`BuildConfig`), one
case's job, the progress events and the final report. Plain data, shared by every
module of the build."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kitsprep.cases import CaseRef
from kitsprep.labels import ANY_EDITION, EDITIONS, any_edition_labels
from kitsprep.spacing import NO_SPACING, Spacing
from kitsprep.window import Window


@dataclass(frozen=True)
class AllowedLabels:
    """The label values a case's mask may hold, and the name a refusal gives them: an
    edition's labels, or under ``--edition auto`` (edition not known yet) any edition's."""

    name: str  # an edition, or labels.ANY_EDITION
    labels: tuple[tuple[str, int], ...]  # (name, value) of the foreground labels

    def unknown_values(self, present: list[int]) -> list[int]:
        """Values among ``present`` that are neither background nor one of these labels."""
        allowed = {0, *(v for _, v in self.labels)}
        return sorted(int(v) for v in present if int(v) not in allowed)


@dataclass(frozen=True)
class BuildConfig:
    src: Path
    out: Path
    window: Window
    size: int = 512
    workers: int = 1
    cases: str | None = None
    resume: bool = False
    overwrite: bool = False
    skip_bad: bool = False
    fsync: bool = True
    edition: str = "auto"  # a key of labels.EDITIONS, or "auto" (from the folder or masks)
    spacing: str = "none"  # `spacing.parse_spacing`'s: auto, none, or mm per pixel

    def identity(self) -> dict:
        """The options that decide the store's contents: a resume must match them."""
        return {
            "size": self.size,
            "window": json.loads(self.window.to_json()),
            "edition": self.edition,
            "spacing": self.spacing,
        }

    @property
    def allowed_labels(self) -> AllowedLabels:
        """The labels a mask may hold: the edition's; under auto, a value no edition has is
        refused now and the edition is decided once every case is read (`finish.decide_labels`)."""
        if self.edition == "auto":
            return AllowedLabels(ANY_EDITION, any_edition_labels())
        return AllowedLabels(self.edition, EDITIONS[self.edition].labels)


@dataclass(frozen=True)
class CaseJob:
    ref: CaseRef
    store: Path
    offsets: np.ndarray
    size: int
    window: Window
    record: Path
    fsync: bool
    labels: AllowedLabels  # values outside it stop the case
    target_spacing: float | None = None  # in-plane mm per stored pixel; None: fit the slice


@dataclass(frozen=True)
class CaseEvent:
    """Progress: one case finished (or was skipped as bad)."""

    case_id: str
    slices: int
    seconds: float
    error: str | None = None
    resumed: bool = False


@dataclass
class BuildReport:
    out: Path
    cases: int
    slices: int
    bytes: int
    seconds: float
    resumed_cases: int = 0
    bad_cases: dict[str, str] = field(default_factory=dict)
    edition: str = ""
    edition_reason: str = ""
    compile_seconds: float = 0.0  # kernels compiled or loaded from cache; not in `seconds`
    spacing: Spacing = NO_SPACING
    # cases resized beyond the target spacing so that their body and labels fit: the factor
    shrunk: dict[str, float] = field(default_factory=dict)

    @property
    def slices_per_s(self) -> float:
        """The build's rate, kernel compilation excluded (what a rerun would see)."""
        return self.slices / self.seconds if self.seconds > 0 else float("inf")
