"""What a run reports while it trains: metrics.jsonl lines, TensorBoard scalars, the
progress bar (or a line per log window), and where the time went (`LogWindow`). Rank 0
alone writes; the other ranks keep the sums and stay quiet.

(Named `log`, not `logging`: it must not shadow the standard library's module.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kitsprep.progress import Progress
from kitstrain.core import rundir
from kitstrain.core.rundir import State

STALL_WARN = 0.10  # loader stall share above which one warning names the fix


@dataclass
class LogWindow:
    """Running sums between two log lines: where the time went."""

    wait: float = 0.0
    slices: int = 0
    loss: torch.Tensor | float = 0.0  # summed on the device: no sync per step
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, slices: int, wait: float) -> None:
        self.loss = self.loss + loss
        self.slices += slices
        self.wait += wait
        self.steps += 1


def tensorboard_writer(run_dir: Path, echo: Callable[[str], None] | None = None) -> Any:
    """TensorBoard event files when tensorboard is installed; otherwise one line says so
    (metrics.jsonl and `kitstrain plot` have the same numbers)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - optional dependency
        if echo is not None:
            echo(
                "note: tensorboard is not installed, so no TensorBoard logs (metrics are in "
                "metrics.jsonl; `kitstrain plot` draws them); `pip install tensorboard` "
                "to get them"
            )
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class RunLog:
    """The run's outputs besides checkpoints. `main` False (ranks other than 0, or a test)
    writes nothing but still sums the loader stall."""

    def __init__(
        self,
        run_dir: Path | None,
        *,
        main: bool,
        echo: Callable[[str], None] | None = None,
        progress: Progress | None = None,
        writer: Any = None,  # a SummaryWriter, or None
        unit: str = "slices",
        on_validation: Callable[[Path], object] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.main = main
        self.echo = echo if main else None
        self.progress = progress if main else None
        self.writer = writer if main else None
        self.unit = unit
        self.on_validation = on_validation if main else None  # e.g. redraw the curves
        self.stall_wait = 0.0  # loader wait and wall time over the steady-state windows
        self.stall_wall = 0.0

    @property
    def stall(self) -> float:
        """The share of the steady-state time the model waited on the loader."""
        return self.stall_wait / max(self.stall_wall, 1e-9)

    def record(self, rec: dict) -> None:
        """One metrics.jsonl line, stamped with the wall clock."""
        if self.main and self.run_dir is not None:
            rundir.append_metrics(self.run_dir, {"time": time.time(), **rec})

    def say(self, line: str) -> None:
        """A line for the user; above the bar when one is showing."""
        if self.progress is not None and self.progress.showing_bar:
            self.progress.note(line)
        elif self.echo is not None:
            self.echo(line)

    def validation_progress(self) -> Progress | None:
        """A fresh display for one validation, shown as the run's own is (a second bar under
        the steps on a terminal, a line per case otherwise); None off rank 0 or when the run
        shows no progress (tests, library use)."""
        p = self.progress
        if p is None or not p.enabled:
            return None
        return Progress(p.stream, bar=p.bar)

    def stepped(self) -> None:
        """One more step on the bar."""
        if self.progress is not None:
            self.progress.advance(1)

    def flush(
        self, win: LogWindow, state: State, lr: float, loss_sum: float | None = None
    ) -> LogWindow:
        """Log the window's train record and start a new window. `loss_sum`: the window's
        summed loss, already read back (the trainer reads it with its decisions, in the
        window's one host sync); read here when not given."""
        loss = (float(win.loss) if loss_sum is None else loss_sum) / max(1, win.steps)
        wall = time.perf_counter() - win.t0
        stall = win.wait / wall if wall > 0 else 0.0
        if state.step > 1:
            # the first step's window is start-up (worker processes, store maps, JIT-compiled
            # kernels loading), not steady-state stall: it would set off a false warning
            self.stall_wait += win.wait
            self.stall_wall += wall
        rec = {
            "kind": "train",
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss,
            "lr": lr,
            "slices_per_s": win.slices / wall,
            "samples_per_s": win.slices / wall,
            "unit": self.unit,
            "stall": stall,
            "data_wait_s": win.wait,
            "wall_s": wall,
            "micro_batch": state.micro_batch,
        }
        self.record(rec)
        if self.progress is not None and self.progress.showing_bar:
            postfix = f"loss={loss:.3f}, sps={rec['slices_per_s']:.0f}, stall={100 * stall:.0f}%"
            self.progress.advance(0, postfix)
        else:
            self.say(
                f"step {state.step} epoch {state.epoch} loss {loss:.4f} lr {lr:.2e} "
                f"{rec['samples_per_s']:.0f} {self.unit}/s loader stall {100 * stall:.0f}%"
            )
        if self.writer is not None:
            for k in ("loss", "lr", "slices_per_s", "stall"):
                self.writer.add_scalar(f"train/{k}", rec[k], state.step)
        return LogWindow()

    def validation(self, val: dict, step: int) -> None:
        """A validation's Dice in TensorBoard, then `on_validation` (the CLI redraws the
        run's curves there: drawing is the report's job, above the loop)."""
        if not self.main or self.run_dir is None:
            return
        if self.writer is not None:
            for k in [f"{r}_dice" for r in val["regions"]] + ["mean_dice"]:
                self.writer.add_scalar(f"val/{k}", val[k], step)
        if self.on_validation is None:
            return
        try:
            self.on_validation(self.run_dir)
        except Exception:  # noqa: BLE001 - a picture must never stop training
            pass

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the bar and flush TensorBoard's events."""
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
