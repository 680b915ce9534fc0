"""`kitstrain bench-loader`: how fast the store loader delivers, against two in-RAM loaders.

Both baselines hold the same slices in one shared-memory tensor and use the same sampler,
batch size, workers, pinning and augmentation:
- the plain in-RAM DataLoader serves one item at a time and lets torch's default_collate
  stack them, as a DataLoader over in-memory tensors does: the bar (store >= 1.0x of it);
- the in-RAM ceiling runs our own batch path (batches written straight into reused
  shared-memory slots), so its ratio isolates what reading from the store costs: one
  `memcpy` per slice against a positioned read, a CRC and, for foreground slices, a label
  inflate.
Peak RSS is read per worker process (VmHWM), because a loader whose workers grow with the
store would fail on the full data set long before any throughput figure mattered.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kitsprep.errors import KitsError
from kitsprep.store import CRC_ON_READ, SliceReader, StoreInfo, crc32, open_store
from kitstrain.data.augment import AugmentConfig, compile_kernels
from kitstrain.data.dataset import SliceDataset
from kitstrain.data.loaders import close_loader, train_loader_for


class InRamDataset(SliceDataset):
    """A SliceDataset whose slices are already in memory: everything but the reading is
    shared with the real one (augmentation, seeding, tensor conversion)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        rows: np.ndarray,
        augment: AugmentConfig | None,
        seed: int = 0,
    ):
        self.images = images.share_memory_()  # workers see it, under fork or spawn
        self.labels = labels.share_memory_()
        self.rows = rows
        self._background = np.zeros(len(rows), bool)
        self.size = images.shape[-1]
        self.patch = self.size
        self.context = (images.shape[1] - 1) // 2
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed = seed
        self._reader = None
        self._rng = None
        self._pid = None
        self.pool = None

    def _open(self) -> None:
        self._seed_rng()

    def _read_into(self, i: int, img: np.ndarray, lab: np.ndarray) -> None:
        img[...] = self.images[i].numpy()
        lab[...] = self.labels[i].numpy()


class ItemByItem(Dataset):
    """In-RAM slices served one item at a time and stacked by torch's default_collate: what
    a plain DataLoader over in-memory tensors does (a tensor per item, then a stacking copy
    into a fresh shared-memory batch)."""

    def __init__(self, ram: InRamDataset):
        self.ram = ram
        self.rows = ram.rows
        self.channels = ram.channels
        self.patch = ram.patch
        self.side = ram.side
        self.pool = None

    def __len__(self) -> int:
        return len(self.ram)

    def __getitem__(self, item):
        return self.ram[item]


def _proc_kb(pid: int, key: str, name: str = "status") -> float | None:
    """A `key: N kB` line of /proc/<pid>/<name>, in kB; None where unreadable."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _mb(kb: float | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process has used (from /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run(
    loader: DataLoader,
    seconds: float,
    warmup: int,
    device: torch.device | None,
    transform=None,
) -> dict:
    """Slices/s after `warmup` batches (worker start, kernel load, full prefetch queues);
    then each worker's peak RSS, read while the workers are still alive. `transform`:
    what training does to a batch with device-augmentation params once on `device`."""
    it = iter(loader)
    pids = [w.pid for w in getattr(it, "_workers", [])]

    def batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:  # an epoch ended: persistent workers carry on
            it = iter(loader)
            return next(it)

    try:
        for _ in range(warmup):
            batch()
        slices = batches = 0
        procs = [os.getpid(), *pids]
        cpu0 = [_cpu_s(p) for p in procs]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds or batches == 0:
            got = batch()
            img, lab = got[:2]
            if device is not None:  # what the training loop does with each batch
                img = img.to(device, non_blocking=True)
                lab = lab.to(device, non_blocking=True)
                if transform is not None and len(got) > 2:
                    img, lab = transform(img, lab, got[2])
            slices += img.shape[0]
            batches += 1
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        # share of one core each process used while timed: shows which side is the limit
        cpu_s = [
            None if a is None or b is None else b - a
            for a, b in zip(cpu0, [_cpu_s(p) for p in procs], strict=True)
        ]
        busy = [None if c is None else round(c / elapsed, 2) for c in cpu_s]
        rss = [_mb(_proc_kb(pid, "VmHWM")) for pid in pids]
        pss = [_mb(_proc_kb(pid, "Pss", "smaps_rollup")) for pid in pids]
        # the pool's batch slots a worker has written: shared, bounded by the prefetch
        # budget, the same for any store size
        shmem = [_mb(_proc_kb(pid, "RssShmem")) for pid in pids]
    finally:
        close_loader(loader)
    return {
        "slices": slices,
        "batches": batches,
        "seconds": elapsed,
        "slices_per_s": slices / elapsed,
        "worker_peak_rss_mb": rss,
        "worker_pss_mb": pss,
        "worker_shmem_mb": shmem,
        "main_cpu": busy[0],
        "worker_cpu": busy[1:],
        "cpu_s": cpu_s,
    }


def bench_loader(
    store_path: Path | str,
    batch_size: int = 16,
    workers: int = 2,
    seconds: float = 10.0,
    augment: bool = False,
    context: int = 0,
    in_ram_slices: int = 512,
    prefetch_factor: int = 4,
    multiprocessing_context: str | None = None,
) -> dict:
    """Measure the training loader on a store, then the in-RAM ceiling and the plain in-RAM
    DataLoader with the same settings. Uniform sampling over every labelled slice;
    `mb_per_s` counts bytes read from the store (image chunks of all context channels +
    deflated label chunks).
    Targets (2 cores, 512x512, batch 16, 2 workers): `ratio_plain` (store / plain in-RAM
    DataLoader) >= 1.0 without augmentation, >= 1,000 slices/s with it, worker peak RSS
    < 400 MB apart from the pool's shared batch slots (`worker_shmem_mb`, bounded by the
    prefetch budget), whatever the store's size."""
    store_path = Path(store_path)
    info, cases = labelled_store(store_path)
    aug = AugmentConfig() if augment else None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else None
    seed = 0
    ds = SliceDataset(store_path, info, cases, context=context, augment=aug, seed=seed)
    # enough draws per epoch that an epoch boundary does not fall inside a short run
    settings = dict(
        batch_size=batch_size,
        workers=workers,
        fg_fraction=0.0,
        label_weights=None,
        seed=seed,
        samples_per_epoch=max(len(ds), 50_000),
        pin_memory=cuda,
        prefetch_factor=prefetch_factor,
        persistent_workers=True,
        multiprocessing_context=multiprocessing_context,
    )
    warmup = max(4, 2 * workers * prefetch_factor)
    if aug is not None and multiprocessing_context in (None, "fork"):
        compile_kernels()  # once here, before forking, not per worker

    # The store first: workers fork from a parent that holds no in-RAM copy yet.
    store = _run(train_loader_for(ds, **settings), seconds, warmup, device)
    main_peak = _mb(_proc_kb(os.getpid(), "VmHWM"))

    positions = np.unique(np.linspace(0, len(ds) - 1, min(in_ram_slices, len(ds))).astype(int))
    images = torch.empty((len(positions), ds.channels, info.size, info.size), dtype=torch.float16)
    labels = torch.empty((len(positions), info.size, info.size), dtype=torch.uint8)
    reader = SliceDataset(store_path, info, cases, context=context)
    for j, pos in enumerate(positions):
        img, lab = reader[int(pos)]
        images[j], labels[j] = img, lab
    ram_ds = InRamDataset(images, labels, ds.rows[positions], aug, seed=seed)
    ceiling = _run(train_loader_for(ram_ds, **settings), seconds, warmup, device)
    plain = _run(train_loader_for(ItemByItem(ram_ds), **settings), seconds, warmup, device)
    del ram_ds, images, labels

    crc_us = _crc_us_per_slice(store_path, info, ds.rows)
    # share of the store path's worker time that checking each read's CRC-32 costs
    crc_share = (
        crc_us * 1e-6 * ds.channels * store["slices_per_s"] / max(1, workers)
        if CRC_ON_READ
        else 0.0
    )
    # all-background labels are zero-filled from the index, not read
    read_bytes = ds.channels * info.size * info.size * 2 + float(
        np.mean(np.where(ds._background, 0, ds.rows["label_nbytes"]))
    )
    return {
        "store": str(store_path),
        "slices_per_s": store["slices_per_s"],
        "mb_per_s": store["slices_per_s"] * read_bytes / 1e6,
        "in_ram_slices_per_s": ceiling["slices_per_s"],
        "ratio": store["slices_per_s"] / ceiling["slices_per_s"],
        "plain_in_ram_slices_per_s": plain["slices_per_s"],
        "ratio_plain": store["slices_per_s"] / plain["slices_per_s"],
        "crc_checked": CRC_ON_READ,
        "crc_us_per_slice": crc_us,
        "crc_share": crc_share,
        "worker_peak_rss_mb": store["worker_peak_rss_mb"],
        "worker_pss_mb": store["worker_pss_mb"],
        "worker_shmem_mb": store["worker_shmem_mb"],
        "main_peak_rss_mb": main_peak,
        "batches": store["batches"],
        "seconds": store["seconds"],
        "main_cpu": store["main_cpu"],
        "worker_cpu": store["worker_cpu"],
        "in_ram": {
            k: ceiling[k]
            for k in ("batches", "seconds", "worker_peak_rss_mb", "main_cpu", "worker_cpu")
        },
        "plain_in_ram": {
            k: plain[k]
            for k in ("batches", "seconds", "worker_peak_rss_mb", "main_cpu", "worker_cpu")
        },
        "settings": {
            "batch_size": batch_size,
            "workers": workers,
            "seconds": seconds,
            "augment": bool(augment),
            "context": context,
            "channels": ds.channels,
            "size": info.size,
            "store_slices": len(ds),
            "store_bytes": store_path.stat().st_size,
            "in_ram_slices": len(positions),
            "prefetch_factor": prefetch_factor,
            "persistent_workers": True,
            "pin_memory": cuda,
            "device": str(device or "cpu"),
            "multiprocessing_context": multiprocessing_context or "default",
            "sampler": "uniform (ForegroundSampler, fg_fraction 0)",
            "warmup_batches": warmup,
            "cpus": os.cpu_count(),
        },
    }


def labelled_store(store_path: Path) -> tuple[StoreInfo, list[str]]:
    """The store and its labelled cases, which every loader benchmark reads; a store
    without any is one line."""
    info = open_store(store_path)
    if not info.labelled_cases:
        raise KitsError(
            f"{store_path} holds no labelled case; the loader benchmark reads "
            "training slices, build a store with segmentations"
        )
    return info, info.labelled_cases


def _crc_us_per_slice(store_path: Path, info, rows: np.ndarray, n: int = 64) -> float:
    """Microseconds one image slice's CRC-32 takes here (ISA-L's where installed), right
    after its read as in the loader: the bytes are still in the CPU's cache."""
    m = SliceReader(store_path, info.size, info.case_ids, check_crc=False)
    out = np.empty((info.size, info.size), np.float16)
    seconds = 0.0
    try:
        pick = rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)]
        for row in pick:
            m.image(row, out=out)
            t0 = time.perf_counter()
            crc32(out)
            seconds += time.perf_counter() - t0
    finally:
        m.close()
    return seconds / len(pick) * 1e6


def format_bench(result: dict) -> str:
    """The human-readable table for `kitstrain bench-loader`."""
    s = result["settings"]
    rss = result["worker_peak_rss_mb"]
    rss_text = ", ".join(f"{v:.0f}" for v in rss if v is not None) or "n/a (no workers)"
    shm = [v for v in result["worker_shmem_mb"] if v is not None]
    if shm:
        rss_text += f" (of which shared batch slots: {', '.join(f'{v:.0f}' for v in shm)})"
    lines = [
        f"loader bench: {result['store']}",
        f"  {s['store_slices']} slices of {s['size']}x{s['size']}, {s['channels']} channel(s), "
        f"batch {s['batch_size']}, {s['workers']} worker(s), prefetch {s['prefetch_factor']}, "
        f"augmentation {'on' if s['augment'] else 'off'}, pin_memory {s['pin_memory']}, "
        f"{s['cpus']} CPUs",
        f"  {'':24}{'slices/s':>10}{'MB/s':>10}",
        f"  {'store (preadv)':24}{result['slices_per_s']:>10.0f}{result['mb_per_s']:>10.0f}",
        f"  {'in-RAM ceiling':24}{result['in_ram_slices_per_s']:>10.0f}"
        f"  ({s['in_ram_slices']} slices in one tensor)",
        f"  {'plain in-RAM DataLoader':24}{result['plain_in_ram_slices_per_s']:>10.0f}"
        "  (an item at a time, default_collate)",
        f"  {'store / plain in-RAM':24}{result['ratio_plain']:>10.2f}  (target >= 1.00)",
        f"  {'store / in-RAM ceiling':24}{result['ratio']:>10.2f}"
        "  (what reading the store costs against a memcpy)",
        "  CRC-32 of every read: "
        + (
            f"on, {result['crc_us_per_slice']:.1f} us per slice, "
            f"{100 * result['crc_share']:.1f}% of the workers' time"
            if result["crc_checked"]
            else "off (no ISA-L; `kitsprep verify` is the check)"
        ),
        f"  worker peak RSS (MB): {rss_text}",
        f"  main peak RSS (MB): {result['main_peak_rss_mb']}",
        f"  CPU busy (cores): main {result['main_cpu']}, workers "
        f"{', '.join(str(v) for v in result['worker_cpu']) or '-'}; "
        f"in-RAM run: main {result['in_ram']['main_cpu']}, workers "
        f"{', '.join(str(v) for v in result['in_ram']['worker_cpu']) or '-'}",
        f"  timed {result['batches']} batches in {result['seconds']:.1f} s after "
        f"{s['warmup_batches']} warm-up batches",
    ]
    return "\n".join(lines)
