"""`kitstrain fit --cascade`: two stages in one run directory, each an ordinary `fit` on a
store derived for it (`train.cascade_stores`): RUN/coarse/ (slices at the coarse size,
trained on patches as a single-stage run at that side is) then RUN/fine/ (the kidney
regions, shrunk by the fine factor), on the same split. RUN/config.json records the
cascade (coarse size and patch, fine factor, side and patch, margin, the budget split,
which stages are done), so `--resume` continues whichever stage was running.

Why patches and a fine factor (measured on 2 CPU cores, 512² store, width 16, 10 min):
every stage moves ~280K px/s, so whole 128² coarse slices (0.68 s/step) and 192² fine
patches at full resolution (2.05 s/step) got ~250 and ~190 steps, against ~2,600 for the
single-stage default's 64² patches; both stages were badly under-trained."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

from kitsprep.errors import KitsError
from kitsprep.store import open_store
from kitstrain.core import rundir
from kitstrain.core.cascade import CASCADE, STAGES, read_cascade, write_cascade
from kitstrain.core.config import RESUMABLE, TrainConfig
from kitstrain.data.downsample import coarse_factor, fine_factor
from kitstrain.data.patches import resolve_patch
from kitstrain.train.cascade_stores import derive_stage_stores
from kitstrain.train.config import FitConfig, FitResult
from kitstrain.train.fit import fit

__all__ = ["coarse_patch", "fine_patch", "fit_cascade", "stage_budget"]

CASCADE_FIELDS = frozenset(
    {"cascade", "cascade_margin", "coarse_size", "coarse_share", "fine_factor"}
)
FINE_PATCH = 128  # the fine stage's default patch side, in fine-store pixels


def stage_budget(tc: TrainConfig, spent_s: float = 0.0) -> dict[str, dict]:
    """Each stage's --time-limit and --max-steps: the coarse stage `coarse_share` of what
    is left after `spent_s` (deriving the stores), the fine stage the rest."""
    out: dict[str, dict] = {}
    share = tc.coarse_share
    left = None if tc.time_limit is None else max(1.0, tc.time_limit - spent_s)
    coarse_steps = None if tc.max_steps is None else max(1, round(tc.max_steps * share))
    out["coarse"] = {
        "time_limit": None if left is None else left * share,
        "max_steps": coarse_steps,
    }
    out["fine"] = {
        "time_limit": None if left is None else left * (1 - share),
        "max_steps": None if tc.max_steps is None else max(1, tc.max_steps - coarse_steps),
    }
    return out


def coarse_patch(tc: TrainConfig, side: int, divisor: int) -> int | str:
    """The coarse stage's patch: the single-stage rule (`resolve_patch`) at the coarse
    side, so the preset's 'auto' is half of it (64 at 128²), with the preset's foreground
    sampling; `full` trains whole slices. A `--patch` in pixels is the fine stage's, so the
    coarse stage then takes 'auto'."""
    if tc.patch in (None, "full"):
        return "full"
    return resolve_patch("auto" if isinstance(tc.patch, int) else tc.patch, side, divisor)


def fine_patch(tc: TrainConfig, side: int, divisor: int) -> int:
    """The fine stage's patch on its store of `side`: `--patch` when it is a side in
    pixels (`full`: the fine store's side), else 128 (a kidney with context at the fine
    resolution), rounded to the network; never more than the fine store's side."""
    if isinstance(tc.patch, int):
        return min(tc.patch, side)
    if tc.patch in (None, "full"):
        return side
    return min(max(2 * divisor, FINE_PATCH // divisor * divisor), side)


def fit_cascade(
    cfg: FitConfig,
    show_progress: bool = True,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    on_validation: Callable[[Path], object] | None = None,
) -> FitResult:
    """Derive the stage stores (kept on --resume), then train the stages still to do."""
    run_dir = cfg.out or (
        rundir.newest_run()
        if cfg.resume
        else rundir.RUNS_ROOT / datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    record = read_cascade(run_dir) if cfg.resume else None
    if record is None and (run_dir / rundir.CONFIG).is_file():
        hint = "continue it without --cascade" if cfg.resume else "choose another --out"
        raise KitsError(f"{run_dir} already holds a run; {hint}")
    info = open_store(cfg.store)
    if record is not None:
        tc = _recorded_train(record, cfg, run_dir)
        if record[CASCADE]["store_fingerprint"] != info.fingerprint:
            raise KitsError(
                f"--resume: {cfg.store} is not the store {run_dir} trained on; pass that store"
            )
    else:
        tc = cfg.train
    factor = coarse_factor(info.size, tc.coarse_size)
    divisor = 2**tc.depth
    if (info.size // factor) % divisor:
        raise KitsError(
            f"the coarse stage's {info.size // factor}x{info.size // factor} slices do not "
            f"divide by {divisor} (2**depth); choose another --coarse-size or lower --depth"
        )
    # a recorded run keeps its factor (records before it was an option: 1, full size)
    fine = int(record[CASCADE].get("fine_factor", 1)) if record else None
    fine = fine_factor(info.size, tc.fine_factor) if fine is None else fine
    if (info.size // fine) % divisor:
        raise KitsError(
            f"--fine-factor {fine} leaves {info.size // fine}x{info.size // fine} slices, "
            f"which do not divide by {divisor} (2**depth); choose another or lower --depth"
        )
    tc = replace(tc, fine_factor=fine)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    echo(f"cascade: deriving the stage stores in {run_dir / 'stores'}")
    stores = derive_stage_stores(info, run_dir, factor, tc.cascade_margin, divisor, fine)
    spent = time.monotonic() - t0
    limits_given = cfg.explicit & {"time_limit", "max_steps"}
    if record is None:
        record = {
            CASCADE: {
                "version": 1,
                "stages": list(STAGES),
                "store": str(info.path),
                "store_fingerprint": info.fingerprint,
                "store_size": info.size,
                "coarse_size": info.size // factor,
                "coarse_factor": factor,
                "margin_mm": tc.cascade_margin,
                "coarse_share": tc.coarse_share,
                "coarse_patch": coarse_patch(tc, info.size // factor, divisor),
                "fine_factor": fine,
                "fine_side": stores.fine_side,
                "fine_patch": fine_patch(tc, stores.fine_side, divisor),
                "derive_s": round(spent, 2),
                "budget": stage_budget(tc, spent),
                "done": [],
            },
            "train": asdict(tc),
        }
        write_cascade(run_dir, record)
    elif limits_given:  # new limits on --resume: split them again
        record[CASCADE]["budget"] = stage_budget(tc)
        record["train"] = asdict(tc)
        write_cascade(run_dir, record)
    cas = record[CASCADE]
    for stage in STAGES:
        # a finished stage trains again only under new limits; the last one always answers
        # (a finished run says so, as a single-stage --resume does)
        if stage in cas["done"] and not limits_given and stage != STAGES[-1]:
            continue
        budget = cas["budget"][stage]
        stage_tc = replace(
            tc,
            cascade=False,
            time_limit=budget["time_limit"],
            max_steps=budget["max_steps"],
            # records before coarse patches trained the coarse stage on whole slices
            patch=cas.get("coarse_patch", "full") if stage == "coarse" else cas["fine_patch"],
        )
        out = run_dir / stage
        split = {} if stage == "coarse" else rundir.read_split(run_dir / "coarse")
        stage_cfg = replace(
            cfg,
            store=stores.coarse if stage == "coarse" else stores.fine,
            train=stage_tc,
            out=out,
            resume=(out / rundir.CONFIG).is_file(),
            train_cases=",".join(split["train"]) if split else cfg.train_cases,
            val_cases=",".join(split["val"]) if split else cfg.val_cases,
            # the fine stage takes the coarse stage's split (a --fold's included) as cases
            **({"fold": None, "folds": None, "splits": None} if split else {}),
            explicit=(cfg.explicit - CASCADE_FIELDS) | {"time_limit", "max_steps"},
        )
        side = cas["coarse_size"] if stage == "coarse" else cas["fine_side"]
        echo(f"cascade: {stage} stage on {side}x{side} slices ({budget_text(budget)})")
        result = fit(stage_cfg, show_progress, echo, on_validation)
        if stage == "coarse":  # one split for both stages, and for `score`'s default cases
            rundir.write_json(run_dir / rundir.SPLIT, rundir.read_split(out))
        if stage not in cas["done"]:
            cas["done"].append(stage)
            write_cascade(run_dir, record)
    return replace(result, run_dir=run_dir)


def budget_text(budget: dict) -> str:
    parts = []
    if budget["time_limit"] is not None:
        parts.append(f"{budget['time_limit']:.0f} s")
    if budget["max_steps"] is not None:
        parts.append(f"{budget['max_steps']} steps")
    return ", ".join(parts) or "its epochs"


def _recorded_train(record: dict, cfg: FitConfig, run_dir: Path) -> TrainConfig:
    """The recorded options, with the limits and loader knobs a --resume may change."""
    saved = rundir.from_record(run_dir, rundir.CONFIG, lambda r: TrainConfig(**r), record["train"])
    changed = {
        k
        for k in cfg.explicit - RESUMABLE - CASCADE_FIELDS
        if getattr(cfg.train, k) != getattr(saved, k)
    }
    if changed:
        raise KitsError(
            f"--resume keeps the run's recorded options, but {', '.join(sorted(changed))} "
            f"differ from {run_dir}/config.json; drop those flags, or start a new run"
        )
    return replace(saved, **{k: getattr(cfg.train, k) for k in cfg.explicit & RESUMABLE})
