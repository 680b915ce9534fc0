"""A diverged run, caught without a host sync per step: non-finite losses counted on the
device, checked at each log line."""

from __future__ import annotations

import torch

from kitsprep.errors import KitsError
from kitstrain.core.config import TrainConfig

DIVERGED_STEPS = 20  # non-finite losses in a row that stop an fp16 (scaled) run


class Divergence:
    """Non-finite losses, counted on the device (no host sync per step) and checked at each
    log line. Without a gradient scaler one NaN/Inf loss has already spoilt the weights, so
    it stops the run; with fp16's scaler, skipped steps are normal and only a persistent run
    of them (DIVERGED_STEPS in a row) stops it."""

    def __init__(self, device: torch.device, tolerate: bool) -> None:
        self.limit = DIVERGED_STEPS if tolerate else 1
        z = torch.zeros((), device=device)
        self.bad_run, self.worst = z.clone(), z.clone()  # non-finite losses in a row
        self.run_start, self.worst_start = z.clone(), z.clone()  # step each run began
        self.last_loss, self.last_step = z.clone(), z.clone()

    def update(self, loss: torch.Tensor, step: int) -> None:
        ok = torch.isfinite(loss.detach()).to(self.bad_run.dtype)
        at = torch.full_like(self.run_start, step)
        self.bad_run = (self.bad_run + 1) * (1 - ok)
        self.run_start = torch.where(self.bad_run == 1, at, self.run_start)
        self.worst_start = torch.where(self.bad_run > self.worst, self.run_start, self.worst_start)
        self.worst = torch.maximum(self.worst, self.bad_run)
        self.last_loss = torch.where(ok > 0, loss.detach().float(), self.last_loss)
        self.last_step = torch.where(ok > 0, at, self.last_step)

    def check(self, tc: TrainConfig) -> None:
        """Stop the run (KitsError) once the non-finite losses reach the limit."""
        if float(self.worst) >= self.limit:
            self.fail(tc)

    def fail(self, tc: TrainConfig) -> None:
        """The one line that stops a diverged run: this rank's own details where it saw
        the non-finite losses, else that another rank did (the count is agreed by MAX)."""
        if float(self.worst) < self.limit:
            raise KitsError(
                "training diverged: another rank's loss became NaN/Inf; no checkpoint "
                f"holds the diverged weights. Start a new run with a lower --lr (this one: "
                f"{tc.lr:g})"
            )
        start = int(self.worst_start)
        last = (
            f"last finite loss {float(self.last_loss):.4g} at step {int(self.last_step)}"
            if int(self.last_step) > 0
            else "no finite loss before it"
        )
        raise KitsError(
            f"training diverged: the loss is NaN/Inf from step {start} ({last}); "
            f"no checkpoint holds the diverged weights. Start a new run with a "
            f"lower --lr (this one: {tc.lr:g})"
        )
