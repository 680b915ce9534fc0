"""The training options (`TrainConfig`) and the presets, as data. A preset is a dict of
`TrainConfig` fields; command-line flags override single fields on top of it. No
subclassing. Names that refer to registries (loss, norm, optimizer, schedule) are checked
against them by `kitstrain.train.setup.check_names`, beside the code they name."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from kitsprep.errors import KitsError
from kitstrain.core.options import (
    PATCH_CHOICES,
    option,
    option_of,
    parse_batch,
    parse_duration,
    parse_label_weights,
    parse_patch,
    parse_workers,
)
from kitstrain.core.precision import PRECISIONS

AUGMENT_SIDES = ("auto", "device", "workers")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; config.json records the resolved values. Each field
    but `preset` is a `kitstrain fit` flag declared here (`option`): its help, its parsing
    and whether `--resume` may change it."""

    preset: str = "default"
    epochs: int = option(50, kind=int, low=1, resumable=True)
    # an int, or "auto" (memory.choose_batch_size)
    batch_size: int | str = option(
        16,
        "N, or 'auto' (on CUDA the batch with the fastest per-sample step; on CPU the preset's).",
        parse=parse_batch,
    )
    lr: float = option(3e-3, kind=float)
    # an int, or "auto" (kitstrain.core.workers.resolve_workers: this rank's cores - 1)
    workers: int | str = option(
        "auto",
        "DataLoader workers: N, or 'auto' (the cores this rank may use minus one, 1..16).",
        parse=parse_workers,
        resumable=True,
    )
    augment_on: str = option(
        "auto",
        "Where augmentation runs: 'device' (batched on the GPU after the copy; workers "
        "only read and cut), 'workers' (on the CPU), 'auto' (device on CUDA).",
        choices=AUGMENT_SIDES,
        resumable=True,
    )
    dist_timeout: float = option(  # seconds
        300.0,
        "DDP: a collective that waits longer than this (e.g. 90s, 5m) stops every rank.",
        parse=parse_duration,
        resumable=True,
    )
    context: int = option(
        2, "2.5D: K neighbouring slices each side as channels.", kind=int, low=0, high=8
    )
    max_steps: int | None = option(None, kind=int, low=1, resumable=True)
    time_limit: float | None = option(  # seconds
        None, "Stop cleanly after e.g. 90s, 10m, 2h.", parse=parse_duration, resumable=True
    )
    val_every: int | None = option(
        None, "Also validate every N steps.", kind=int, low=1, resumable=True
    )
    val_budget: float = option(
        0.15,
        "With --time-limit: the share of it that all validation together may use (the final "
        "one included); where validating every case would take more, a seeded subset spread "
        "over tumour sizes is validated, and less often.",
        kind=float,
        low=0,
        high=1,
        open_low=True,
        resumable=True,
    )
    seed: int = option(0, kind=int)
    compile: bool = option(False, "torch.compile the model.", kind=bool)
    precision: str = option(
        "auto",
        "auto: bf16 (else fp16) on CUDA, fp32 on CPU. bf16 on CPU is ~2x faster "
        "where the CPU has AMX/AVX512-BF16.",
        choices=PRECISIONS,
    )
    # None: as many pixels as the training slices
    samples_per_epoch: int | None = option(None, kind=int, low=1)
    network: str = option(
        "unet",
        "The network, by name (kitstrain.model.networks).",
        registry=("kitstrain.model.networks", "NETWORKS"),
    )
    width: int = option(
        32, "U-Net features at the first level (doubling per level).", kind=int, low=1
    )
    depth: int = option(4, "Down-sampling steps.", kind=int, low=1, high=8)
    deep_supervision: int = option(  # extra heads at 1/2, 1/4, ... (training only)
        0,
        "Also supervise N coarser decoder levels (1/2, 1/4, ...) in training.",
        kind=int,
        low=0,
        high=7,
    )
    norm: str = option("batch", registry=("kitstrain.model.layers", "NORMS"))
    # training patch side: pixels, "auto" (half), None/"full"
    patch: int | str | None = option(
        "auto",
        "Training patch: 'auto' (half the slice side), 'full' or a side in pixels.",
        parse=parse_patch,
    )
    optimizer: str = option("adamw", registry=("kitstrain.train.optim", "OPTIMIZERS"))
    weight_decay: float = option(1e-4, kind=float, low=0)
    schedule: str = option("cosine", registry=("kitstrain.train.optim", "SCHEDULES"))
    warmup: float = option(
        0.03, "Share of the run spent warming the learning rate up.", kind=float, low=0, high=1
    )
    # binary per region with `regions`
    loss: str = option("ce+dice", registry=("kitstrain.model.losses", "LOSSES"))
    fg_fraction: float = option(
        0.5, "Share of each batch drawn from slices with foreground.", kind=float, low=0, high=1
    )
    # a foreground slice's weight within that share: the largest weight among the labels it
    # holds (by label name; unnamed labels weigh 1). Names the store's edition lacks are
    # ignored when they come from a preset, refused when given on the command line.
    label_weights: dict[str, float] = option(
        {"tumour": 4.0, "cyst": 2.0},
        "Weight of a foreground slice within that share, by the labels it holds, "
        "e.g. tumour=4,cyst=2 (the largest applies; other labels weigh 1), or 'none'.",
        parse=parse_label_weights,
    )
    regions: bool = option(
        False,
        "Train one sigmoid per region the store's edition scores (KiTS19: "
        "kidney+tumour, tumour) instead of a softmax over its labels.",
        kind=bool,
        off="--classes",
    )
    augment: bool = option(
        True, "Spatial and intensity augmentation.", kind=bool, off="--no-augment"
    )
    grad_clip: float | None = option(12.0, kind=float, low=0, open_low=True)
    log_every: int = option(20, "Steps per log line.", kind=int, low=1, resumable=True)
    # issue 19: a coarse whole-slice stage at low resolution finds the kidneys, a fine
    # stage at full resolution segments their regions (kitstrain.train.cascade)
    cascade: bool = option(
        False,
        "Two stages in one run: a coarse model at --coarse-size finds the kidneys, a fine "
        "model segments their regions (at --fine-factor); inference runs both. Off by "
        "default: at 10 min on 2 CPU cores it scored below the single stage at 128x128 "
        "(benchmarks/cascade.sh; README).",
        kind=bool,
        off="--no-cascade",
    )
    cascade_margin: float = option(
        20.0, "Cascade: mm added around each kidney region.", kind=float, low=0
    )
    # None: a quarter of the slice side on stores of 256 and above, the side below that
    coarse_size: int | None = option(
        None,
        "Cascade: the coarse stage's slice side; divides the store's [default: side/4 "
        "from 256 up, else the side].",
        kind=int,
        low=1,
    )
    # None: 2 on stores of 512 and above (the fine stage at 256-equivalent resolution: a
    # quarter of the pixels per step), else 1
    fine_factor: int | None = option(
        None,
        "Cascade: the fine stage trains and predicts the kidney regions shrunk by this "
        "factor; divides the store's side [default: 2 from 512 up, else 1].",
        kind=int,
        low=1,
    )
    coarse_share: float = option(
        0.3,
        "Cascade: share of --time-limit / --max-steps the coarse stage trains.",
        kind=float,
        low=0,
        high=1,
        open_low=True,
    )


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
# the recommended recipe in two stages (issue 19); whether it becomes the default is measured
PRESETS["cascade"] = {**PRESETS["default"], "cascade": True}

FIELD_NAMES = {f.name for f in fields(TrainConfig)}
# the options a --resume may change: limits and loader knobs, never the recipe
RESUMABLE = frozenset(f.name for f in fields(TrainConfig) if (o := option_of(f)) and o.resumable)


def parse_overrides(given: dict[str, object]) -> dict[str, object]:
    """Flag values -> field values: text parsed by each field's `Option.parse`; None (a
    flag not given) stays None, so the preset's value holds."""
    out = {}
    for f in fields(TrainConfig):
        if f.name not in given:
            continue
        value, opt = given[f.name], option_of(f)
        if opt is not None and opt.parse is not None and isinstance(value, str):
            value = opt.parse(value)
        out[f.name] = value
    unknown = set(given) - FIELD_NAMES
    if unknown:
        raise KitsError(f"unknown training option(s) {sorted(unknown)}")
    return out


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
    if not 0 < cfg.val_budget <= 1:
        raise KitsError(f"--val-budget must be a share within (0, 1], found {cfg.val_budget}")
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
    if not (
        cfg.workers == "auto"
        or (isinstance(cfg.workers, int) and not isinstance(cfg.workers, bool) and cfg.workers >= 0)
    ):
        raise KitsError(f"--workers must be 'auto' or a count >= 0, found {cfg.workers!r}")
    if cfg.augment_on not in AUGMENT_SIDES:
        raise KitsError(
            f"--augment-on must be one of {', '.join(AUGMENT_SIDES)}, found {cfg.augment_on!r}"
        )
    if not cfg.dist_timeout > 0:
        raise KitsError(f"--dist-timeout must be longer than 0 s, found {cfg.dist_timeout:g}")
    if cfg.context < 0:
        raise KitsError(f"--context must be >= 0, found {cfg.context}")
    if not 0 < cfg.coarse_share < 1:
        raise KitsError(
            f"--coarse-share must be between 0 and 1 (both stages train), found {cfg.coarse_share}"
        )


def check_patch(patch: object) -> None:
    """Refuse a patch setting that no store could take: not 'auto', 'full', None or a
    positive pixel count."""
    if patch in (None, "auto", "full"):
        return
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise KitsError(f"--patch must be {PATCH_CHOICES}; found {patch!r}")
