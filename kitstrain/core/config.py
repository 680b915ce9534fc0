"""The training options (`TrainConfig`) and the presets, as data. A preset is a dict of
`TrainConfig` fields; command-line flags override single fields on top of it. No
subclassing. Names that refer to registries (loss, norm, optimizer, schedule) are checked
against them by `kitstrain.train.setup.check_names`, beside the code they name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from kitsprep.errors import KitsError
from kitstrain.core.precision import PRECISIONS


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; config.json records the resolved values."""

    preset: str = "default"
    epochs: int = 50
    batch_size: int | str = 16  # an int, or "auto" (memory.choose_batch_size)
    lr: float = 3e-3
    optimizer: str = "adamw"  # a name in train.optim.OPTIMIZERS
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # a name in train.optim.SCHEDULES
    warmup: float = 0.03  # share of the run spent warming the lr up linearly
    loss: str = "ce+dice"  # a name in losses.LOSSES (binary per region with `regions`)
    regions: bool = False  # a sigmoid per scored region of the store's edition
    norm: str = "batch"  # a name in unet.NORMS
    width: int = 32
    depth: int = 4
    deep_supervision: int = 0  # extra heads at 1/2, 1/4, ... (training only)
    context: int = 2  # 2.5D: K neighbours each side as channels
    patch: int | str | None = "auto"  # training patch side: pixels, "auto" (half), None/"full"
    fg_fraction: float = 0.5  # share of each batch from slices with foreground
    # a foreground slice's weight within that share: the largest weight among the labels it
    # holds (by label name; unnamed labels weigh 1). Names the store's edition lacks are
    # ignored when they come from a preset, refused when given on the command line.
    label_weights: dict[str, float] = field(default_factory=lambda: {"tumour": 4.0, "cyst": 2.0})
    augment: bool = True
    samples_per_epoch: int | None = None  # None: as many pixels as the training slices
    val_every: int | None = None  # also validate every N steps (epochs always do)
    log_every: int = 20
    workers: int = 2
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (see memory.amp_dtype)
    compile: bool = False
    grad_clip: float | None = 12.0
    max_steps: int | None = None
    time_limit: float | None = None  # seconds


PRESETS: dict[str, dict] = {
    # The origin report's setup, as described: Adam, lr 0.002, batch 4, one epoch,
    # cross-entropy, no normalisation layers, uniform sampling of whole slices, nothing else.
    "seed": dict(
        epochs=1,
        batch_size=4,
        lr=2e-3,
        optimizer="adam",
        weight_decay=0.0,
        schedule="constant",
        warmup=0.0,
        loss="ce",
        norm="none",
        context=0,
        fg_fraction=0.0,
        label_weights={},
        augment=False,
        grad_clip=None,
        patch="full",
        regions=False,
    ),
    # What we recommend (measured on the CPU quality benchmark, benchmarks/quality.sh):
    # batch norm (its running statistics carry over from patches to whole slices; instance
    # norm would see other statistics at inference), CE + soft Dice, half-side patches
    # around foreground pixels, half of each batch from foreground slices with tumour
    # slices weighted 4x (tumours are rare and small) and cyst slices 2x (KiTS21/23; rarer
    # than kidney, but larger and easier than tumours), warm-up then cosine decay,
    # augmentation with nnU-Net's 2D ranges (rotation +-180 deg, zoom 0.7-1.4: see
    # augment.AugmentConfig), 2.5D context of 2 slices each side (small tumours show
    # across slices), and region-based outputs as nnU-Net trains KiTS: one sigmoid per
    # region the edition scores (KiTS19: kidney+tumour, tumour), so a tumour voxel is not a
    # rival of the kidney class (see README, Benchmarks, for the measured runs).
    "default": dict(
        epochs=50,
        batch_size=16,
        lr=3e-3,
        optimizer="adamw",
        weight_decay=1e-4,
        schedule="cosine",
        warmup=0.03,
        loss="ce+dice",
        norm="batch",
        context=2,
        patch="auto",
        fg_fraction=0.5,
        label_weights={"tumour": 4.0, "cyst": 2.0},
        augment=True,
        grad_clip=12.0,
        regions=True,
    ),
}

FIELD_NAMES = {f.name for f in fields(TrainConfig)}
PATCH_CHOICES = "'auto' (half the slice side), 'full' (whole slices) or a side in pixels"


def resolve(preset: str, overrides: dict) -> TrainConfig:
    """Preset fields, then every override that is not None."""
    if preset not in PRESETS:
        raise KitsError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    unknown = set(overrides) - FIELD_NAMES
    if unknown:
        raise KitsError(f"unknown training option(s) {sorted(unknown)}")
    # dicts copied: a run's config must not share (and so mutate) the preset's own
    cfg = replace(
        TrainConfig(),
        preset=preset,
        **{k: dict(v) if isinstance(v, dict) else v for k, v in PRESETS[preset].items()},
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = replace(cfg, **given)
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    if cfg.batch_size != "auto" and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise KitsError(
            f"--batch-size must be a positive integer or 'auto', found {cfg.batch_size!r}"
        )
    if not 0.0 <= cfg.fg_fraction <= 1.0:
        raise KitsError(f"fg_fraction must be within 0..1, found {cfg.fg_fraction}")
    bad = {
        k: w
        for k, w in cfg.label_weights.items()
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0
    }
    if bad:
        raise KitsError(
            f"--label-weights must be positive numbers, found {bad}; e.g. tumour=4,cyst=2"
        )
    for f in fields(cfg):  # NaN passes every range check, and inf is no setting either
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise KitsError(f"--{f.name.replace('_', '-')} must be a finite number, found {v}")
    if cfg.lr <= 0:
        raise KitsError(f"--lr must be positive, found {cfg.lr}")
    if cfg.time_limit is not None and cfg.time_limit <= 0:
        raise KitsError(
            f"--time-limit must be longer than 0 s, found {cfg.time_limit:g}; "
            "leave it out for no limit"
        )
    if cfg.epochs < 1:
        raise KitsError(f"--epochs must be at least 1, found {cfg.epochs}")
    check_patch(cfg.patch)
    if cfg.precision not in PRECISIONS:
        raise KitsError(
            f"--precision must be one of {', '.join(PRECISIONS)}, found {cfg.precision!r}"
        )
    if not 0 <= cfg.deep_supervision < cfg.depth:
        raise KitsError(
            f"--deep-supervision must be within 0..depth-1 = {cfg.depth - 1}, "
            f"found {cfg.deep_supervision}"
        )
    if cfg.context < 0:
        raise KitsError(f"--context must be >= 0, found {cfg.context}")


def check_patch(patch: object) -> None:
    """Refuse a patch setting that no store could take: not 'auto', 'full', None or a
    positive pixel count."""
    if patch in (None, "auto", "full"):
        return
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise KitsError(f"--patch must be {PATCH_CHOICES}; found {patch!r}")
