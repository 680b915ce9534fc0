"""The training loop: `Trainer.run` reads top to bottom (step until a stop reason, validate
when due, checkpoint, stop); each piece is a small method below it.

No host sync inside a step: the loss, the divergence count and (DDP) every rank's clock
decisions are read back once per log window (`decide`), in one read, after one all-reduce
(MAX) of the decisions, so every rank acts on the same ones at the same step. The step
limit is the same count on every rank. The loader's batches run on across epochs
(`EpochStream`): an epoch ends when its steps are counted, not when an iterator stops."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader

from kitsprep.errors import KitsError
from kitstrain.core import rundir
from kitstrain.core.rundir import State
from kitstrain.data.device_augment import augment_batch
from kitstrain.data.loaders import next_batch
from kitstrain.data.prefetch import DeviceBatches
from kitstrain.train import distributed
from kitstrain.train.budget import (
    EARLY_CHECK_STEP,
    early_warning,
    periodic_allowed,
    predicted_steps,
    seconds_text,
    shortfall_warning,
)
from kitstrain.train.config import FitResult, Plan, step_limit
from kitstrain.train.distributed import agree, agree_max
from kitstrain.train.divergence import Divergence
from kitstrain.train.evaluate import evaluate, unwrap, validation_due
from kitstrain.train.faults import clock_skew, install_faults
from kitstrain.train.log import STALL_WARN, LogWindow, RunLog
from kitstrain.train.memory import cudnn_tuning, free_memory, is_oom, peak_memory_mb
from kitstrain.train.optim import apply_gradients, lr_at, progress_of

CHECKPOINT_EVERY_S = 120.0  # a `last` checkpoint at least this often, besides validations
STOP_TIME, CHECKPOINT_DUE = 1, 2  # bits of the decision rank 0 broadcasts per log window


class Trainer:
    """A run's model, optimizer, scaler, loss and `State`, the loader it draws from and the
    log it writes; `run()` trains it to a stop reason."""

    def __init__(
        self,
        plan: Plan,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        loss_fn: Callable,
        state: State,
        loader: DataLoader,
        log: RunLog,
    ) -> None:
        self.plan, self.tc, self.d = plan, plan.tc, plan.d
        self.model, self.optimizer, self.scaler, self.loss_fn = model, optimizer, scaler, loss_fn
        self.state, self.loader, self.log = state, loader, log
        self.divergence = Divergence(plan.device, tolerate=scaler is not None)
        install_faults(unwrap(model), lambda: self.state.step, self.d.rank)  # tests only
        self.window = LogWindow()
        self.warned_stall = False
        self.said_pace = False  # the one line saying validations wait for the budget
        self.paced_from: tuple[int, float] | None = None  # (step, train s) after the 1st step
        self.stop_reason = ""
        self.progress = 0.0  # of the schedule (`optim.progress_of`), never going back
        self.last_val: dict | None = None
        self.peaks: list[float] | None = None  # each rank's peak GPU memory over the run
        # the run's clock, across resumes (a test may skew one rank's: `faults.clock_skew`)
        self.t_run = time.perf_counter() - state.elapsed - clock_skew(self.d.rank)
        self.last_checkpoint = time.perf_counter()
        self.trained_since_val = 0.0
        self.step0 = state.step
        self.t_fetch = self.t_got = time.perf_counter()  # around the last loader wait

    # ------------------------------------------------------------------ the loop

    def run(self) -> FitResult:
        """Train until a stop reason: steps or epochs done, or the time limit (which counts
        the final validation). Validate every --val-every steps and at epoch ends when it
        costs a bounded share; checkpoint at each validation and every few minutes."""
        self.model.train()
        # one iterator for the whole run: the workers' pipeline never drains at an epoch end
        batches = DeviceBatches(iter(self.loader), self.plan.device, self.device_augment)
        while not self.stop_reason:
            if self.state.step_in_epoch >= self.plan.steps_per_epoch:  # an epoch is done
                self.end_epoch()
                if self.state.epoch >= self.tc.epochs:
                    self.stop_reason = "epochs"
                    break
                if self.epoch_validation_due():
                    self.validate()
                continue
            batch = self.next_batch(batches)
            if batch is None:
                raise RuntimeError("the training loader ended; its batches should not")
            due = self.step(batch)
            self.stop_reason = step_limit(self.state, self.tc, self.plan.total_steps) or (
                "time_limit" if due & STOP_TIME else ""
            )
            if self.step_validation_due() and not self.stop_reason:
                self.validate()
            elif due & CHECKPOINT_DUE:
                self.checkpoint(["last"])
        if self.state.step_in_epoch >= self.plan.steps_per_epoch:
            self.end_epoch()  # the run's last step also ended its epoch
        if self.window.steps:
            self.flush_log(float(self.window.loss))
        self.validate(final=True)
        self.track_peaks()
        return self.finish()

    def device_augment(
        self, images: torch.Tensor, labels: torch.Tensor, params
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Device augmentation of a batch of the workers' cuts (`--augment-on device`)."""
        return augment_batch(images, labels, params, self.plan.patch, self.plan.info.size)

    # ------------------------------------------------------------------ one step

    def next_batch(self, batches: Iterator) -> tuple | None:
        """The loader's next batch (None at the epoch's end), timing the wait for it."""
        self.t_fetch = time.perf_counter()
        batch = next_batch(batches)
        self.t_got = time.perf_counter()
        return batch

    def step(self, batch: tuple) -> int:
        """One optimizer step at the schedule's learning rate, and its bookkeeping; returns
        the decisions every rank takes at this step (`decide`)."""
        state = self.state
        # monotone: the final validation's estimate may shrink once one has been timed
        self.progress = max(
            self.progress,
            progress_of(state, self.plan.total_steps, self.plan.run_tc, self.val_estimate()),
        )
        lr = lr_at(self.progress, self.plan.run_tc)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss = self.optimize(batch[0], batch[1])
        self.divergence.update(loss, state.step + 1)
        state.step += 1
        state.step_in_epoch += 1
        self.window.add(loss, batch[0].shape[0] * self.d.world, self.t_got - self.t_fetch)
        now = time.perf_counter()
        self.trained_since_val += now - self.t_fetch
        state.train_seconds += now - self.t_fetch
        state.elapsed = now - self.t_run
        self.log.stepped()
        self.check_pace()
        return self.decide()

    def optimize(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step over the batch, in micro-batches of `state.micro_batch`
        (gradient accumulation keeps the effective batch). On OOM in one process: halve the
        micro-batch, log, retry. Under DDP a retry cannot be agreed without a host sync
        every step, and one rank retrying alone hangs the others in the gradient
        all-reduce: every rank stops at once instead, and --resume continues with half
        the micro-batch (`rundir.OOM_RECORD`)."""
        while True:
            try:
                return self.accumulate(images, labels)
            except Exception as exc:  # noqa: BLE001 - only OOM is handled; the rest re-raise
                if not is_oom(exc):
                    raise
                self.back_off(images.shape[0])

    def back_off(self, batch: int) -> None:
        """After an OOM: drop the step's gradients and halve the micro-batch (one process),
        or record the half and stop every rank (DDP)."""
        state, d = self.state, self.d
        self.optimizer.zero_grad(set_to_none=True)
        free_memory(self.plan.device)
        if state.micro_batch <= 1:
            raise KitsError(
                "out of GPU memory even with a micro-batch of 1 slice; use a "
                "smaller --size store, a smaller model, or a larger GPU"
            ) from None
        half = state.micro_batch // 2
        if d.world > 1:
            rundir.record_oom(self.plan.run_dir, state.step, d.rank, half)
            raise KitsError(
                f"rank {d.rank} ran out of GPU memory at step {state.step} with a "
                f"micro-batch of {state.micro_batch}; every rank stops (one rank "
                f"retrying alone would hang the others). Continue with micro-batch {half}: "
                f"the same command with --resume --out {self.plan.run_dir}"
            ) from None
        state.micro_batch = half
        self.log.record(
            {
                "kind": "oom",
                "step": state.step,
                "micro_batch": half,
                "accumulation": math.ceil(batch / half),
            }
        )

    def accumulate(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward per micro-batch (DDP syncs gradients on the last only),
        then clip and step; returns the batch's loss, still on the device."""
        model, scaler, optimizer = self.model, self.scaler, self.optimizer
        device, dtype, mb = self.plan.device, self.plan.dtype, self.state.micro_batch
        n = images.shape[0]
        chunks = list(range(0, n, mb))
        total = torch.zeros((), device=device)
        for i, s in enumerate(chunks):
            x = images[s : s + mb].to(device, non_blocking=True)
            y = labels[s : s + mb].to(device, non_blocking=True).long()
            x = x.float().contiguous(memory_format=torch.channels_last)
            sync = i == len(chunks) - 1 or not hasattr(model, "no_sync")
            with model.no_sync() if not sync else nullcontext():
                with torch.autocast(
                    device.type, dtype=dtype or torch.float32, enabled=dtype is not None
                ):
                    loss = self.loss_fn(model(x), y) * (x.shape[0] / n)
                (scaler.scale(loss) if scaler else loss).backward()
            total += loss.detach()
        apply_gradients(model, optimizer, scaler, self.tc.grad_clip)
        return total

    # ------------------------------------------------------------------ logging

    def log_due(self) -> bool:
        return self.state.step % self.tc.log_every == 0 or self.state.step == 1

    def flush_log(self, loss_sum: float) -> None:
        self.window = self.log.flush(
            self.window, self.state, self.optimizer.param_groups[0]["lr"], loss_sum=loss_sum
        )

    def warn_stall(self) -> None:
        """Once per run, when the loader holds the model back for long."""
        if (
            self.warned_stall
            or not self.d.main
            or self.state.step < 5 * self.tc.log_every
            or self.log.stall <= STALL_WARN
        ):
            return
        self.warned_stall = True
        what = "GPU" if self.plan.device.type == "cuda" else "model"
        self.log.say(
            f"warning: the {what} waited on the loader {100 * self.log.stall:.0f}% of the "
            f"time; raise --workers (now {self.plan.workers})"
            + (
                ", or --augment-on device (the GPU augments, the workers only read)"
                if self.plan.augment_side == "workers" and self.plan.device.type == "cuda"
                else ""
            )
            + ", or put the store on faster disk"
        )

    # ------------------------------------------------------------------ decisions

    def clock_bits(self) -> int:
        """This rank's clock decisions (host only): time limit reached (counting the final
        validation), periodic checkpoint due."""
        bits = 0
        if self.tc.time_limit and self.state.elapsed + self.val_estimate() >= self.tc.time_limit:
            bits |= STOP_TIME
        if time.perf_counter() - self.last_checkpoint > CHECKPOINT_EVERY_S:
            bits |= CHECKPOINT_DUE
        return bits

    def decide(self) -> int:
        """What every rank does after this step. In one process the clocks are read each
        step (host only). At a log window's end, one host read: the window's loss, the
        divergence count and, under DDP, every rank's clock bits and divergence count
        reduced by MAX first, so a time limit one rank reaches, or a NaN one rank alone
        sees, stops every rank at the same step."""
        window_end = self.log_due()
        if not window_end:
            return self.clock_bits() if self.d.world == 1 else 0
        bits = self.clock_bits()
        loss = self.window.loss
        loss = loss if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        flags = torch.stack(
            [
                self.divergence.worst.float(),
                torch.full((), float(bits & STOP_TIME), device=self.plan.device),
                torch.full((), float(bits & CHECKPOINT_DUE), device=self.plan.device),
            ]
        )
        flags = agree_max(self.d, flags)
        loss_sum, worst, stop, ckpt = torch.cat(
            [loss.detach().float().reshape(1).to(flags.device), flags]
        ).tolist()  # the window's one host sync
        self.flush_log(loss_sum)
        if worst >= self.divergence.limit:
            self.divergence.fail(self.tc)
        self.warn_stall()
        return (STOP_TIME if stop else 0) | (CHECKPOINT_DUE if ckpt else 0)

    def val_estimate(self) -> float:
        """The next validation's duration: the last one's, or before any, the budget's
        estimate from timed validation slices (`evaluate.seconds_per_slice`)."""
        if self.state.last_val_seconds:
            return self.state.last_val_seconds
        v = self.plan.validation
        return v.seconds(self.d.world) if v is not None else 0.0

    def step_validation_due(self) -> bool:
        """Every --val-every steps, while the time budget allows (rank 0 decides that)."""
        if not self.tc.val_every or self.state.step % self.tc.val_every:
            return False
        return not self.tc.time_limit or bool(
            agree(self.d, self.plan.device, int(self.budget_allows()))
        )

    def epoch_validation_due(self) -> bool:
        """A bounded share of the run: rank 0 decides, every rank follows."""
        due = validation_due(self.trained_since_val, self.state.last_val_seconds)
        return bool(agree(self.d, self.plan.device, int(due and self.budget_allows())))

    def budget_allows(self) -> bool:
        """Under --time-limit, whether a validation along the way fits --val-budget with
        the final one's share kept (`budget.periodic_allowed`); the first time one does
        not, one line says validations wait for it."""
        v, limit, state = self.plan.validation, self.tc.time_limit, self.state
        if v is None or not limit:
            return True
        one = self.val_estimate()
        if periodic_allowed(state.val_seconds, one, v.budget_s, state.elapsed, limit):
            return True
        if not self.said_pace:
            self.said_pace = True
            line = (
                f"validating less often than asked: a validation takes about "
                f"{seconds_text(one)}, and validation may use {seconds_text(v.budget_s)} of "
                f"--time-limit {seconds_text(limit)} (--val-budget {self.tc.val_budget:g}), "
                "the final one's share kept; the rest is spread over the run"
            )
            self.log.say(line)
            self.log.record({"kind": "note", "step": state.step, "message": line})
        return False

    def check_pace(self) -> None:
        """At `EARLY_CHECK_STEP` steps into a time-limited run, one warning when the pace of
        the steps since the first (which pays for start-up) predicts too few steps."""
        limit, state = self.tc.time_limit, self.state
        if not limit:
            return
        done = state.step - self.step0
        if done == 1:
            self.paced_from = (state.step, state.train_seconds)
        if done != EARLY_CHECK_STEP or self.paced_from is None:
            return
        step_s = (state.train_seconds - self.paced_from[1]) / (state.step - self.paced_from[0])
        steps = predicted_steps(state.step, step_s, state.elapsed, self.val_estimate(), limit)
        line = early_warning(steps, step_s, limit)
        if line is not None:
            self.log.say(line)
            self.log.record({"kind": "warning", "step": state.step, "message": line})

    # ------------------------------------------------------------------ epochs, validation

    def end_epoch(self) -> None:
        """Count the epoch, move the sampler on, log the epoch's peak memory per rank."""
        state = self.state
        state.epoch += 1
        state.step_in_epoch = 0
        peaks = self.track_peaks()
        if peaks is not None:
            torch.cuda.reset_peak_memory_stats(self.plan.device)  # the next is that epoch's
        self.log.record(
            {
                "kind": "epoch",
                "epoch": state.epoch,
                "step": state.step,
                "peak_memory_mb": max(peaks) if peaks else None,
                "peak_memory_mb_ranks": peaks,
            }
        )

    def track_peaks(self) -> list[float] | None:
        """Every rank's peak since the last reset, folded into the run's peaks."""
        peaks = distributed.rank_peaks(self.plan.device, self.d)
        if peaks is not None:
            self.peaks = [max(a, b) for a, b in zip(self.peaks or peaks, peaks, strict=True)]
        return peaks

    def validate(self, final: bool = False) -> dict:
        """Score the validation cases, log them, checkpoint (`best` too when the mean Dice
        improved). Its time counts neither as training throughput nor toward the next
        epoch-end validation."""
        state, plan = self.state, self.plan
        t = time.perf_counter()
        with cudnn_tuning(False):  # whole slices: new shapes, which must not tune again
            val = evaluate(self.model, plan, self.log.validation_progress())
        state.last_val_seconds = time.perf_counter() - t
        state.val_seconds += state.last_val_seconds
        state.elapsed = time.perf_counter() - self.t_run
        improved = val["mean_dice"] > state.best
        if improved:
            state.best = val["mean_dice"]
        self.log.record(
            {
                "kind": "val",
                "step": state.step,
                "epoch": state.epoch,
                "final": final,
                "seconds": state.last_val_seconds,
                "peak_memory_mb": peak_memory_mb(plan.device),
                **val,
            }
        )
        self.checkpoint(["last", "best"] if improved else ["last"])
        self.log.validation(val, state.step)
        self.window.t0 += time.perf_counter() - t  # training throughput excludes validation
        self.trained_since_val = 0.0
        self.last_val = val
        return val

    def checkpoint(self, which: list[str]) -> None:
        """Every rank calls this at the same point: each one's RNG streams are gathered,
        rank 0 writes. A diverged model stops the run here on every rank (DDP keeps their
        weights equal), before any checkpoint holds it."""
        weights = unwrap(self.model).state_dict()
        rundir.refuse_nonfinite(self.plan.run_dir, weights, self.state.step)
        rngs = distributed.gather(self.d, rundir.rng_state(self.plan.device))
        if self.d.main:
            payload = {
                "model": weights,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else {},
                "state": json.dumps(asdict(self.state)),
                "rng": {"ranks": rngs},
            }
            with distributed.writing():  # a peer's failure lets it finish first
                rundir.save_training(self.plan.run_dir, which, payload)
        self.last_checkpoint = time.perf_counter()

    def finish(self) -> FitResult:
        """The `end` record and the result; a run stopped by its time limit that trained
        too little carries a warning saying why and what to change (`shortfall_warning`)."""
        state, tc = self.state, self.tc
        warning = None
        if self.stop_reason == "time_limit" and tc.time_limit:
            warning = shortfall_warning(
                state.step,
                state.train_seconds,
                state.val_seconds,
                state.elapsed,
                tc.time_limit,
                self.validated(),
            )
        self.log.record(
            {
                "kind": "end",
                "step": state.step,
                "epoch": state.epoch,
                "reason": self.stop_reason,
                "stall": self.log.stall,
                "peak_memory_mb": max(self.peaks) if self.peaks else None,
                "peak_memory_mb_ranks": self.peaks,
                "elapsed": state.elapsed,
                "train_seconds": state.train_seconds,
                "val_seconds": state.val_seconds,
                "warning": warning,
            }
        )
        return FitResult(
            self.plan.run_dir,
            state.step,
            state.epoch,
            state.best,
            self.last_val,
            self.log.stall,
            self.stop_reason,
            warning or "",
        )

    def validated(self) -> str:
        """What one validation covers, e.g. "3 of 15 cases (412 slices at 512x512)"."""
        cases, v, size = self.plan.val_cases, self.plan.validation, self.plan.info.size
        n = sum(self.plan.info.cases[c].slices for c in cases)
        of = f" of {v.all_cases}" if v is not None and v.all_cases != len(cases) else ""
        return f"{len(cases)}{of} case(s) ({n:,} slices at {size}x{size})"
