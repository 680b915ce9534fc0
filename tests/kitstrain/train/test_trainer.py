"""The Trainer's pieces on a tiny CPU model: one step, gradient accumulation, the OOM
back-off, and the loop's stop reasons, epochs, validations and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kitsprep.store import open_store
from kitstrain.core import rundir
from kitstrain.core.config import resolve
from kitstrain.core.rundir import State
from kitstrain.data.splits import make_split
from kitstrain.model.losses import make_loss
from kitstrain.model.unet import UNetConfig, build_model
from kitstrain.train.config import Plan
from kitstrain.train.distributed import Dist
from kitstrain.train.log import RunLog
from kitstrain.train.optim import lr_at, make_optimizer
from kitstrain.train.trainer import Trainer

BATCH, PATCH, STEPS_PER_EPOCH = 4, 16, 3


class Loader:
    """What the Trainer asks of a DataLoader: batches without end (epochs are the plan's
    steps_per_epoch), each iterator from the start."""

    def __init__(self, labels: int) -> None:
        self.labels = labels
        self.batches = 0  # handed out, over all iterators

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            image = torch.randn(BATCH, 1, PATCH, PATCH, generator=g).half()
            label = torch.randint(0, self.labels, (BATCH, PATCH, PATCH), generator=g)
            self.batches += 1
            yield image, label.to(torch.uint8)


def make_trainer(store: Path, run_dir: Path, micro_batch: int = BATCH, **options) -> Trainer:
    info = open_store(store)
    tc = resolve(
        "seed",
        {"optimizer": "sgd", "lr": 0.01, "context": 0, "width": 4, "depth": 2, **options},
    )
    torch.manual_seed(0)
    model = build_model(
        UNetConfig(in_channels=1, num_classes=info.num_classes, width=4, depth=2, norm="none")
    )
    epochs_steps = tc.epochs * STEPS_PER_EPOCH
    plan = Plan(
        run_dir=run_dir,
        info=info,
        split=make_split(info, None, None, seed=0),
        tc=tc,
        run_tc=tc,
        d=Dist(),
        device=torch.device("cpu"),
        dtype=None,
        patch=PATCH,
        batch_size=BATCH,
        val_batch=1,
        samples_per_epoch=BATCH * STEPS_PER_EPOCH,
        steps_per_epoch=STEPS_PER_EPOCH,
        total_steps=min(epochs_steps, tc.max_steps or epochs_steps),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(
        plan,
        model,
        make_optimizer(model, tc),
        None,
        make_loss(tc.loss, info.labels),
        State(micro_batch=micro_batch),
        Loader(info.num_classes),
        RunLog(run_dir, main=True, unit="patches"),
    )


def batch_of(t: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(t.loader))


def test_a_step_sets_the_schedule_s_lr_counts_and_logs(loader_store: Path, tmp_path: Path) -> None:
    t = make_trainer(loader_store, tmp_path / "run", log_every=1)
    before = [p.detach().clone() for p in t.model.parameters()]
    t.next_batch(iter(t.loader))  # starts the loader-wait clock, as run() does
    t.step(batch_of(t))
    assert (t.state.step, t.state.step_in_epoch) == (1, 1)
    assert t.optimizer.param_groups[0]["lr"] == lr_at(0.0, t.plan.run_tc)
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))
    (rec,) = rundir.read_metrics(t.plan.run_dir)
    assert rec["kind"] == "train" and rec["step"] == 1 and rec["unit"] == "patches"
    assert t.window.steps == 0  # flushed into the record


def test_micro_batches_accumulate_to_the_whole_batch_s_step(
    loader_store: Path, tmp_path: Path
) -> None:
    whole = make_trainer(loader_store, tmp_path / "a")
    halves = make_trainer(loader_store, tmp_path / "b", micro_batch=2)
    batch = batch_of(whole)
    la = whole.accumulate(*batch)
    lb = halves.accumulate(*batch)
    assert float(la) == pytest.approx(float(lb), rel=1e-5)
    for a, b in zip(whole.model.parameters(), halves.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_oom_halves_the_micro_batch_and_the_step_is_retried(
    loader_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KITS_INJECT_OOM_AT_STEP", "0")
    t = make_trainer(loader_store, tmp_path / "run")
    t.optimize(*batch_of(t))
    assert t.state.micro_batch == BATCH // 2
    (rec,) = rundir.read_metrics(t.plan.run_dir)
    assert rec == {**rec, "kind": "oom", "step": 0, "micro_batch": 2, "accumulation": 2}


def test_the_loop_stops_at_max_steps_mid_epoch(loader_store: Path, tmp_path: Path) -> None:
    t = make_trainer(loader_store, tmp_path / "run", epochs=2, max_steps=4, log_every=2)
    result = t.run()
    assert (result.stop_reason, result.steps, result.epochs) == ("max_steps", 4, 1)
    assert t.loader.batches == 4  # one stream: no epoch start drew a batch it did not use
    records = rundir.read_metrics(t.plan.run_dir)
    assert [r["kind"] for r in records if r["kind"] in ("epoch", "end")] == ["epoch", "end"]
    vals = [r for r in records if r["kind"] == "val"]
    assert vals[-1]["final"] and vals[-1]["step"] == 4
    last = rundir.load_checkpoint(rundir.checkpoint_path(t.plan.run_dir, "last"))
    assert json.loads(last["state"])["step"] == 4
    assert rundir.checkpoint_path(t.plan.run_dir, "best").is_file()


def test_the_loop_ends_on_the_last_epoch_s_last_step(loader_store: Path, tmp_path: Path) -> None:
    t = make_trainer(loader_store, tmp_path / "run", epochs=2)
    result = t.run()
    assert (result.stop_reason, result.steps, result.epochs) == ("epochs", 6, 2)
    assert t.loader.batches == 6
    epochs = [r for r in rundir.read_metrics(t.plan.run_dir) if r["kind"] == "epoch"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 3), (2, 6)]
    assert result.last_val is not None and result.best_mean_dice == max(
        r["mean_dice"] for r in rundir.read_metrics(t.plan.run_dir) if r["kind"] == "val"
    )


SYNCS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "numpy")


def test_a_step_reads_nothing_back_but_once_per_log_window(
    loader_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No host sync inside a step: `.item()`, `.cpu()`, `.tolist()`, float(), int() or
    bool() of a tensor, counted over 40 steps with a log line every 10, at most one per
    window (the loss, the divergence count and the decisions come back together)."""
    t = make_trainer(loader_store, tmp_path / "run", epochs=50, max_steps=40, log_every=10)
    t.step(batch_of(t))  # step 1 logs too (the first line): not counted below
    calls: list[str] = []
    counting = [False]
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            if counting[0]:
                calls.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    batches = iter(t.loader)
    counting[0] = True
    for _ in range(39):  # steps 2..40: windows end at 10, 20, 30, 40
        t.step(next(batches))
    counting[0] = False
    assert t.state.step == 40
    assert len(calls) <= 4, calls
    assert len([r for r in rundir.read_metrics(t.plan.run_dir) if r["kind"] == "train"]) == 5


def test_validation_runs_with_cudnn_tuning_off(
    loader_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole-slice validation shapes must not be tuned again: benchmark mode is off inside
    validation and back on after it."""
    from kitstrain.train import trainer as trainer_module

    seen = []
    real = trainer_module.evaluate

    def spy(model, plan, progress=None):
        seen.append(torch.backends.cudnn.benchmark)
        return real(model, plan, progress)

    monkeypatch.setattr(trainer_module, "evaluate", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    t = make_trainer(loader_store, tmp_path / "run")
    t.validate()
    assert seen == [False] and torch.backends.cudnn.benchmark is True


def budgeted(t: Trainer, one_s: float, budget_s: float) -> Trainer:
    """`t` with a time budget whose validation of its cases is priced at `one_s` seconds."""
    from dataclasses import replace

    from kitstrain.train.budget import ValidationPlan

    cases = tuple(t.plan.split.val)
    slices = sum(t.plan.info.cases[c].slices for c in cases)
    v = ValidationPlan(cases, len(cases), slices, one_s / slices, budget_s, 1)
    t.plan = replace(t.plan, validation=v)
    return t


class FakeClock:
    """The trainer's clock (`time` in its module): a step costs `step_s` and a validation
    `val_s`, whatever the machine's load, so the budget's decisions are exact."""

    def __init__(self, step_s: float, val_s: float) -> None:
        self.now, self.step_s, self.val_s = 1000.0, step_s, val_s

    def perf_counter(self) -> float:
        return self.now


def clocked(
    monkeypatch: pytest.MonkeyPatch, step_s: float, val_s: float, store: Path, run: Path, **opts
) -> Trainer:
    """A budgeted trainer (validation priced at `val_s`, a budget of `val_budget` of the
    limit) on a fake clock: steps and validations advance it by their injected costs."""
    from kitstrain.train import trainer as trainer_module

    clock = FakeClock(step_s, val_s)
    monkeypatch.setattr(trainer_module, "time", clock)

    def evaluate(model, plan, progress=None):
        clock.now += clock.val_s
        return {"mean_dice": 0.5, "regions": [], "per_case": {}}

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    t = make_trainer(store, run, **opts)
    optimize = t.optimize

    def timed(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        clock.now += clock.step_s
        return optimize(images, labels)

    t.optimize = timed
    return budgeted(t, val_s, t.tc.val_budget * t.tc.time_limit)


def test_training_stops_in_time_for_the_final_validation_within_the_limit(
    loader_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1.55 s run of 0.2 s steps whose validation takes 0.4 s of a 0.62 s budget: the
    epoch-end validation waits (the final one's share is kept, one line says so), training
    stops in time for the final one, and the run ends within a step of its limit."""
    opts = {"epochs": 1000, "time_limit": 1.55, "val_budget": 0.4}
    t = clocked(monkeypatch, 0.2, 0.4, loader_store, tmp_path / "run", **opts)
    said: list[str] = []
    t.log.echo = said.append
    result = t.run()
    assert (result.stop_reason, result.steps) == ("time_limit", 6)  # 1.2 s + 0.4 s >= 1.55 s
    assert t.state.elapsed == pytest.approx(1.6)
    vals = [r for r in rundir.read_metrics(t.plan.run_dir) if r["kind"] == "val"]
    assert [v["final"] for v in vals] == [True]  # the epoch end at step 3 did not fit
    assert t.state.val_seconds == pytest.approx(0.4)
    assert sum("validating less often than asked" in line for line in said) == 1
    (note,) = [r for r in rundir.read_metrics(t.plan.run_dir) if r["kind"] == "note"]
    assert note["step"] == 3 and note["message"] in said


def test_validations_along_the_way_spread_over_the_run(
    loader_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--val-every 1 in a 2.05 s run of 0.25 s steps, 0.1 s validations and a 0.5 s
    budget: 0.4 s for the ones along the way, released with the clock, not all at once."""
    opts = {"epochs": 1000, "time_limit": 2.05, "val_budget": 0.5 / 2.05, "val_every": 1}
    t = clocked(monkeypatch, 0.25, 0.1, loader_store, tmp_path / "run", **opts)
    t.run()
    vals = [r for r in rundir.read_metrics(t.plan.run_dir) if r["kind"] == "val"]
    assert vals[-1]["final"] and 1 <= len(vals) - 1 < t.state.step  # fewer than asked
    assert t.state.val_seconds <= 0.5 + 1e-9 and t.state.elapsed <= 2.05 + 0.25
    assert vals[0]["step"] > 1  # the first step's share of the budget was too small


def test_a_run_that_trained_too_little_ends_with_a_recorded_warning(
    loader_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = {"epochs": 1000, "time_limit": 1.0, "val_budget": 0.7}
    t = clocked(monkeypatch, 0.2, 0.7, loader_store, tmp_path / "run", **opts)
    result = t.run()
    assert (result.stop_reason, result.steps) == ("time_limit", 2)
    assert result.warning.startswith("trained 2 steps in 1.0s (0.4s of training, 40% ")
    assert "validation of " in result.warning and "took 0.7s" in result.warning
    end = rundir.read_metrics(t.plan.run_dir)[-1]
    assert end["kind"] == "end" and end["warning"] == result.warning
    assert end["train_seconds"] == pytest.approx(0.4) and end["val_seconds"] == pytest.approx(0.7)


def test_a_max_steps_run_that_reached_its_steps_is_not_warned(
    loader_store: Path, tmp_path: Path
) -> None:
    opts = {"epochs": 2, "max_steps": 4, "time_limit": 600}
    t = budgeted(make_trainer(loader_store, tmp_path / "run", **opts), 0.1, 90)
    result = t.run()
    assert (result.stop_reason, result.warning) == ("max_steps", "")
    assert rundir.read_metrics(t.plan.run_dir)[-1]["warning"] is None


def test_the_pace_at_step_20_predicts_too_few_steps_in_one_line(
    loader_store: Path, tmp_path: Path
) -> None:
    from kitstrain.train.budget import EARLY_CHECK_STEP

    def paced(step_s: float) -> list[str]:
        t = make_trainer(loader_store, tmp_path / f"run{step_s}", time_limit=600)
        said: list[str] = []
        t.log.echo = said.append
        for step in range(1, EARLY_CHECK_STEP + 2):
            t.state.step, t.state.elapsed = step, step * step_s
            t.state.train_seconds = step * step_s
            t.check_pace()
        return said

    (line,) = paced(3.0)  # 20 steps in a minute: 600 s holds about 200
    assert line.startswith("warning: at 3.00 s a step") and "about 200 steps" in line
    assert "--time-limit 10m" in line and "--val-budget" in line
    assert paced(0.5) == []  # about 1,200 steps: quiet


def test_a_validation_slice_is_priced_on_the_validation_path(
    loader_store: Path, tmp_path: Path
) -> None:
    """The probe runs the run's model through validation's inference (batch, context), in
    eval mode and back: a forward that costs 20 ms a slice prices a slice at about that."""
    import time

    from kitstrain.train.evaluate import seconds_per_slice

    t = make_trainer(loader_store, tmp_path / "run")
    modes: list[bool] = []

    def slow(module, args):
        modes.append(module.training)
        time.sleep(0.02 * args[0].shape[0])

    t.model.register_forward_pre_hook(slow)
    price = seconds_per_slice(t.model, t.plan)
    assert 0.02 <= price < 1.0
    assert modes and not any(modes) and t.model.training
    # a warm-up batch, then up to 8 slices in batches of 1 (the case may hold fewer)
    (case,) = t.plan.split.val
    assert len(modes) == min(1 + 8, t.plan.info.cases[case].slices) >= 2
