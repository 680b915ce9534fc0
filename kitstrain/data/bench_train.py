"""`kitstrain bench-loader` on the path training runs by default: half-side patches around
foreground (the default preset's sampling), 2 context slices, augmentation on the side
`--augment-on` picks, the `--workers auto` count. What it reports is what feeds a GPU:

- `samples_per_s`: what the loader delivered here;
- `cpu_ms_per_sample`: every loader process's CPU time (the main process and the workers)
  per sample: the cost that decides how many cores a GPU needs;
- `feeds`: samples/s that `auto` workers would deliver on this machine, from the workers'
  CPU time per sample (each worker is one core's worth);
- with `--augment-on device` off CUDA, the loader measures the workers' share alone (reads
  and cuts), and the device kernel (`device_augment.augment_batch`) is timed apart on CPU
  torch (`device_kernel_samples_per_s`), for reference.

On the device side a worker's first read of a chunk is whole and CRC-checked (~0.19 ms a
512² chunk, against ~0.03 ms for the rows a draw reaches afterwards): on a store far
larger than what the run reads, those first touches weigh in the figure as they do in a
training run's first epoch, once per worker and chunk.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from kitstrain.core.config import PRESETS, TrainConfig
from kitstrain.core.workers import resolve_workers
from kitstrain.data.augment import AugmentConfig, compile_kernels
from kitstrain.data.bench import _mb, _proc_kb, _run, labelled_store
from kitstrain.data.dataset import SliceDataset
from kitstrain.data.device_augment import augment_batch
from kitstrain.data.loaders import train_loader_for
from kitstrain.data.patches import resolve_patch
from kitstrain.data.samplers import Drawn, label_weights_by_value

DIVISOR = 2**TrainConfig.depth  # the default U-Net's: patches are multiples of it


def bench_training_loader(
    store_path: Path | str,
    batch_size: int = 16,
    workers: int | str = "auto",
    seconds: float = 10.0,
    augment_on: str = "auto",
    context: int | None = None,
) -> dict:
    """Measure the default training loader on a store (see the module's docstring)."""
    store_path = Path(store_path)
    info, cases = labelled_store(store_path)
    preset = PRESETS["default"]
    cuda = torch.cuda.is_available()
    side = ("device" if cuda else "workers") if augment_on == "auto" else augment_on
    n_workers, why = resolve_workers(workers)
    auto_workers, _ = resolve_workers("auto")
    patch = resolve_patch(preset["patch"], info.size, DIVISOR)
    context = preset["context"] if context is None else context
    ds = SliceDataset(
        store_path,
        info,
        cases,
        context=context,
        augment=AugmentConfig(),
        seed=0,
        patch=patch,
        augment_on=side,
    )
    weights = label_weights_by_value(info.labels, preset["label_weights"], strict=False)
    loader = train_loader_for(
        ds,
        batch_size=batch_size,
        workers=n_workers,
        fg_fraction=preset["fg_fraction"],
        label_weights=weights,
        seed=0,
        pin_memory=cuda,
    )
    if side == "workers" and n_workers > 0:
        compile_kernels()  # before the workers fork, as fit does
    device = torch.device("cuda") if cuda else None
    transform = None
    if cuda:

        def transform(images, labels, params):
            return augment_batch(images, labels, params, patch, info.size)

    warmup = max(4, 2 * max(1, n_workers))
    run = _run(loader, seconds, warmup, device, transform)
    samples = run["slices"]
    cpu = [c for c in run["cpu_s"] if c is not None]
    worker_cpu = [c for c in run["cpu_s"][1:] if c is not None] or cpu[:1]
    cpu_ms = 1e3 * sum(cpu) / max(1, samples)
    worker_ms = 1e3 * sum(worker_cpu) / max(1, samples)
    out = {
        "store": str(store_path),
        "samples_per_s": run["slices_per_s"],
        "cpu_ms_per_sample": cpu_ms,
        "worker_cpu_ms_per_sample": worker_ms,
        "feeds": auto_workers * 1e3 / max(worker_ms, 1e-9),
        "auto_workers": auto_workers,
        "workers": n_workers,
        "workers_reason": why,
        "augment_on": side,
        "measured": (
            "reads and cuts (the workers' share); the device kernel apart, on CPU torch"
            if side == "device" and not cuda
            else "reads, patches and augmentation"
            + (" (on the GPU after the copy)" if side == "device" else " (in the workers)")
        ),
        "batches": run["batches"],
        "seconds": run["seconds"],
        "main_cpu": run["main_cpu"],
        "worker_cpu": run["worker_cpu"],
        "worker_peak_rss_mb": run["worker_peak_rss_mb"],
        "main_peak_rss_mb": _mb(_proc_kb(os.getpid(), "VmHWM")),
        "settings": {
            "batch_size": batch_size,
            "patch": patch,
            "cut": ds.side,
            "size": info.size,
            "context": context,
            "channels": ds.channels,
            "fg_fraction": preset["fg_fraction"],
            "device": str(device or "cpu"),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    if side == "device" and not cuda:
        out["device_kernel_samples_per_s"] = _kernel_rate(ds, batch_size, min(seconds, 5.0))
    return out


def _kernel_rate(ds: SliceDataset, batch_size: int, seconds: float) -> float:
    """Samples/s of the device-augmentation kernel on CPU torch, on cuts read from the
    store (one batch, augmented again and again with fresh draws)."""
    images, labels = ds._batch_tensors(batch_size, shared=False)
    n = len(ds)
    items = [Drawn(int(i) % n, 0, k) for k, i in enumerate(np.linspace(0, n - 1, batch_size))]
    params = ds._fill(items, images, labels)
    augment_batch(images, labels, params, ds.patch, ds.size)  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done == 0:
        augment_batch(images, labels, params, ds.patch, ds.size)
        done += batch_size
    return done / (time.perf_counter() - t0)


def format_training_bench(r: dict) -> str:
    """The human-readable lines for the default path."""
    s = r["settings"]
    lines = [
        f"loader bench (the default training path): {r['store']}",
        f"  {s['patch']}x{s['patch']} patches of {s['size']}x{s['size']} slices "
        f"(workers cut {s['cut']}x{s['cut']}), {s['channels']} channels, batch "
        f"{s['batch_size']}, {r['workers']} worker(s) ({r['workers_reason']}), augmentation "
        f"on the {r['augment_on']} side; measured: {r['measured']}",
        f"  samples/s here:              {r['samples_per_s']:10.0f}",
        f"  CPU ms per sample, all loader processes: {r['cpu_ms_per_sample']:.2f} "
        f"(workers alone {r['worker_cpu_ms_per_sample']:.2f})",
        f"  feeds with auto workers ({r['auto_workers']}): {r['feeds']:10.0f} samples/s",
        f"  CPU busy (cores): main {r['main_cpu']}, workers "
        f"{', '.join(str(v) for v in r['worker_cpu']) or '-'}",
    ]
    if "device_kernel_samples_per_s" in r:
        lines.append(
            f"  device-augmentation kernel on CPU torch ({s['torch_threads']} threads): "
            f"{r['device_kernel_samples_per_s']:.0f} samples/s (reference; a GPU runs it)"
        )
    return "\n".join(lines)


__all__ = ["bench_training_loader", "format_training_bench"]
