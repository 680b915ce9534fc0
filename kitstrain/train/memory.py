"""GPU memory, explicitly: precision choice, out-of-memory detection, the batch-size search
and choice, and the learning rate for the batch chosen."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from kitstrain.core.config import PRESETS, TrainConfig


@contextlib.contextmanager
def cudnn_tuning(on: bool) -> Iterator[None]:
    """`cudnn.benchmark` set to `on` inside the block, as it was after. Validation runs
    with it off: whole slices, and a case's last short batch, are shapes the training step
    never had, and each new shape would be tuned again (seconds each, every validation)."""
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = was


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, whichever type the allocator raised it as."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Hand cached blocks back after an OOM, so a retry starts from what is really free."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak GPU memory (MiB) since the last reset; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


# Tensors of 2**31 elements or more break kernels without 64-bit indexing (with errors
# that are not OOMs): the search never tries a batch whose largest activation gets there.
ELEMENT_LIMIT = 2**31
# The largest per-GPU batch `--batch-size auto` tries: 8x the default preset's 16. Past
# that the recipe (lr, warm-up, steps per epoch) is far from where it was tuned, and the
# loader's shared-memory batches reach hundreds of MB.
AUTO_BATCH_CAP = 128
# A doubling must buy at least this much throughput per sample to be taken.
MIN_GAIN = 1.10


def find_batch_size(
    run_step: Callable[[int], tuple[float, int | None]],
    *,
    start: int = 2,
    cap: int = AUTO_BATCH_CAP,
    elements_per_sample: int = 0,
    total_bytes: int | None = None,
    margin: float = 0.85,
    min_gain: float = MIN_GAIN,
) -> dict:
    """The per-GPU batch with the fastest per-sample step, not the largest that fits.

    `run_step(n)` runs (and times) real training steps of `n` samples and returns
    (samples/s, peak bytes or None). Batches double from `start` while a doubling gains at
    least `min_gain` in samples/s, stays under `cap`, keeps the largest tensor
    (n * elements_per_sample) under 2**31 elements and its peak under `margin` of
    `total_bytes`; an OOM ends the search like a full card. Throughput flattens long
    before memory runs out on a large GPU (the kernels are already saturated), and every
    doubling past that point only costs optimisation steps per epoch."""
    best: int | None = None
    best_sps = 0.0
    tried: list[dict] = []
    reason = f"reached the cap of {cap}"
    n = max(1, start)
    while n <= cap:
        if elements_per_sample and n * elements_per_sample >= ELEMENT_LIMIT:
            reason = f"batch {n} would hold a tensor of >= 2**31 elements"
            break
        try:
            sps, peak = run_step(n)
        except Exception as exc:  # noqa: BLE001 - only OOM is expected; others re-raise
            if not is_oom(exc):
                raise
            tried.append({"batch": n, "result": "oom"})
            reason = f"batch {n} ran out of memory"
            break
        rec = {"batch": n, "samples_per_s": round(sps, 1)}
        if peak is not None:
            rec["peak_mb"] = round(peak / 2**20, 1)
        tried.append(rec)
        if peak is not None and total_bytes and peak > margin * total_bytes:
            reason = f"batch {n} peaked above {margin:.0%} of the device's memory"
            break
        if best is not None and sps < best_sps * min_gain:
            reason = (
                f"throughput flattened: batch {n} gave {sps:.0f} samples/s, "
                f"{sps / best_sps - 1:+.0%} over batch {best}"
            )
            break
        best, best_sps = n, sps
        n *= 2
    return {
        "batch_size": best or 1,
        "reason": reason,
        "tried": tried,
        "cap": cap,
        "margin": margin,
        "min_gain": min_gain,
        "total_mb": None if total_bytes is None else round(total_bytes / 2**20, 1),
    }


def scale_lr(lr: float, batch: int, reference: int, optimizer: str) -> tuple[float, str]:
    """The learning rate for an effective batch other than the one `lr` was tuned for:
    square-root scaling for Adam/AdamW (the rule that keeps the optimiser's SDE the same
    for adaptive methods, Malladi et al. 2022), linear for SGD (Goyal et al. 2017)."""
    if batch == reference:
        return lr, "none"
    if optimizer == "sgd":
        return lr * batch / reference, "linear"
    return lr * math.sqrt(batch / reference), "sqrt"


def reference_batch(tc: TrainConfig) -> int:
    """The per-step batch the preset's learning rate was tuned for."""
    ref = PRESETS.get(tc.preset, {}).get("batch_size", TrainConfig.batch_size)
    return int(ref) if isinstance(ref, int) else int(TrainConfig.batch_size)


def effective_lr(tc: TrainConfig, batch_size: int, world: int, explicit: frozenset[str]) -> dict:
    """The learning rate for this run's effective batch (batch x ranks): the preset's lr
    is tuned for `reference_batch`; an --lr given on the command line is taken as is."""
    ref, eff = reference_batch(tc), batch_size * world
    if "lr" in explicit:
        lr, rule = tc.lr, "none (--lr given)"
    else:
        lr, rule = scale_lr(tc.lr, eff, ref, tc.optimizer)
    return {
        "lr": lr,
        "base_lr": tc.lr,
        "rule": rule,
        "reference_batch": ref,
        "effective_batch": eff,
    }


def choose_batch_size(
    tc: TrainConfig,
    model: torch.nn.Module,
    loss_fn: Callable,
    patch: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype | None,
    smallest: Callable[[int], int] = lambda n: n,
) -> tuple[int, dict]:
    """`auto` on CUDA: the batch with the fastest per-sample step (`search_batch_size`),
    the same on every rank (`smallest` of the ranks' finds). On CPU memory is not the
    limit and throughput is flat: the preset's batch is kept."""
    if tc.batch_size != "auto":
        return int(tc.batch_size), {"mode": "fixed"}
    if device.type != "cuda":
        bs = reference_batch(tc)
        return bs, {"mode": "auto", "reason": f"CPU: kept the preset's batch of {bs}"}
    found = search_batch_size(model, loss_fn, tc, patch, num_classes, device, dtype)
    bs = smallest(found["batch_size"])
    return bs, {"mode": "auto", **found, "batch_size": bs}


def median_rate(n: int, step_seconds: list[float]) -> float:
    """Samples/s of a batch of `n` from its timed steps: the median step."""
    return n / max(statistics.median(step_seconds), 1e-9)


def largest_activation(tc: TrainConfig, patch: int) -> int:
    """Elements per sample of the U-Net's largest tensor: the full-resolution decoder
    concatenation (2 x width channels), or the input when that is wider."""
    return max(2 * tc.width, 1 + 2 * tc.context) * patch * patch


def search_batch_size(
    model: torch.nn.Module,
    loss_fn: Callable,
    tc: TrainConfig,
    patch: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype | None,
    *,
    cap: int = AUTO_BATCH_CAP,
    steps: int = 5,
    warmup: int = 1,
) -> dict:
    """Time real forward+backward steps at doubling batches (`find_batch_size`): `warmup`
    untimed steps (kernel choice, allocator), then `steps` timed one by one, the median
    taken (one slow step, a clock boost or a neighbour's burst, does not pick the batch),
    with the peak of the memory the allocator *reserved* (what the card must hold, cache
    included, not only what tensors use). Then put the model back exactly as it was:
    weights, batch-norm running statistics, no gradients. A try that fails mid-backward
    leaves partial gradients, and every try's forward moves the running statistics;
    neither may reach the first real step."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cuda = device.type == "cuda"
    channels = 1 + 2 * tc.context

    def run_step(n: int) -> tuple[float, int | None]:
        free_memory(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        x = torch.randn(n, channels, patch, patch, device=device).contiguous(
            memory_format=torch.channels_last
        )
        y = torch.randint(0, num_classes, (n, patch, patch), device=device)
        times: list[float] = []
        try:
            for i in range(warmup + steps):
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with torch.autocast(
                    device.type, dtype=dtype or torch.float32, enabled=dtype is not None
                ):
                    loss = loss_fn(model(x), y)
                loss.backward()
                model.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        finally:
            model.zero_grad(set_to_none=True)
        return median_rate(n, times), torch.cuda.max_memory_reserved(device) if cuda else None

    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    try:
        return find_batch_size(
            run_step, cap=cap, total_bytes=total, elements_per_sample=largest_activation(tc, patch)
        )
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        free_memory(device)
