"""Build benchmark: our `kitsprep build` against a plain reference pipeline and against
gzip decompression alone of the same files, in one run on one cohort.

    python benchmarks/prep.py [--cases 8] [--size 512] [--data data/synthetic/bench512]

Targets: one worker at least 4x the plain pipeline's slices/s, and total time at
most 1.3x decompression alone; near-linear speed-up with --workers up to the core count.
Figures are ratios within this run, so a noisy machine moves both sides together.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from isal import igzip

from kitsprep.build import BuildConfig, build_store
from kitsprep.cases import find_cases
from kitsprep.synth import SynthConfig, write_cohort
from kitsprep.window import WINDOW_PRESETS

WINDOW = WINDOW_PRESETS["mlperf"]


def ensure_cohort(path: Path, cases: int, size: int) -> list:
    if not (path.is_dir() and len(list(path.glob("case_*"))) >= cases):
        shutil.rmtree(path, ignore_errors=True)
        print(f"writing a {cases}-case synthetic cohort at {size}x{size} into {path} ...")
        write_cohort(SynthConfig(cases=cases, size=size, seed=0), path)
    return find_cases(path)[:cases]


def files_of(refs) -> list[Path]:
    return [p for r in refs for p in (r.imaging, r.segmentation) if p is not None]


def warm_cache(files: list[Path]) -> None:
    for p in files:
        p.read_bytes()


def decompress_only(files: list[Path], decompress) -> float:
    t = time.perf_counter()
    for p in files:
        decompress(p.read_bytes())
    return time.perf_counter() - t


def plain_pipeline(refs, out: Path) -> tuple[float, int]:
    """What one writes without thinking about speed: get_fdata, numpy, h5py per case."""
    t = time.perf_counter()
    slices = 0
    with h5py.File(out, "w") as f:
        for r in refs:
            img = nib.load(str(r.imaging)).get_fdata()
            x = (np.clip(img, WINDOW.lo, WINDOW.hi) - WINDOW.offset) / WINDOW.divisor
            x = x.astype(np.float16)
            g = f.create_group(r.case_id)
            g.create_dataset("image", data=x, chunks=(1, *x.shape[1:]))
            if r.segmentation is not None:
                seg = np.asarray(nib.load(str(r.segmentation)).dataobj).astype(np.uint8)
                g.create_dataset(
                    "label",
                    data=seg,
                    chunks=(1, *seg.shape[1:]),
                    compression="gzip",
                    compression_opts=1,
                )
            slices += x.shape[0]
    return time.perf_counter() - t, slices


def ours(src: Path, out: Path, size: int, workers: int, fsync: bool = True) -> tuple[float, int]:
    if out.exists():
        out.unlink()
    t = time.perf_counter()
    rep = build_store(
        BuildConfig(
            src=src, out=out, window=WINDOW, size=size, workers=workers, overwrite=True, fsync=fsync
        )
    )
    return time.perf_counter() - t, rep.slices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--data", type=Path, default=Path("data/synthetic/bench512"))
    ap.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    refs = ensure_cohort(args.data, args.cases, args.size)
    files = files_of(refs)
    mb = sum(p.stat().st_size for p in files) / 2**20
    warm_cache(files)
    tmp = Path(tempfile.mkdtemp(prefix="kits-bench-"))
    sel = ",".join(r.case_id for r in refs)
    src = args.data
    try:
        # Untimed warm-up: numba compiles (cached on disk afterwards).
        build_store(
            BuildConfig(
                src=src,
                out=tmp / "warm.h5",
                window=WINDOW,
                size=args.size,
                workers=1,
                cases=refs[0].case_id,
                overwrite=True,
            )
        )
        t_zlib = decompress_only(files, gzip.decompress)
        t_isal = decompress_only(files, igzip.decompress)
        t_plain, n_plain = plain_pipeline(refs, tmp / "plain.h5")
        rows = []
        for w in sorted({1, 2, args.max_workers}):
            if w > args.max_workers:
                continue
            cfgsel = BuildConfig(
                src=src,
                out=tmp / f"ours{w}.h5",
                window=WINDOW,
                size=args.size,
                workers=w,
                cases=sel,
                overwrite=True,
            )
            t = time.perf_counter()
            rep = build_store(cfgsel)
            rows.append((w, time.perf_counter() - t, rep.slices))
        t1, n1 = rows[0][1], rows[0][2]
        cfg_nofsync = BuildConfig(
            src=src,
            out=tmp / "nofsync.h5",
            window=WINDOW,
            size=args.size,
            workers=1,
            cases=sel,
            overwrite=True,
            fsync=False,
        )
        t = time.perf_counter()
        build_store(cfg_nofsync)
        t_nofsync = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\ncohort: {len(refs)} cases, {n1} slices at {args.size}x{args.size}, "
        f"{mb:.0f} MiB of .nii.gz (page-cached), {os.cpu_count()} cores"
    )
    print(f"{'pipeline':<38}{'seconds':>9}{'slices/s':>10}")
    print(f"{'gzip decompress only (zlib)':<38}{t_zlib:9.2f}{n1 / t_zlib:10.0f}")
    print(f"{'gzip decompress only (isal)':<38}{t_isal:9.2f}{n1 / t_isal:10.0f}")
    print(f"{'plain: get_fdata+numpy+h5py':<38}{t_plain:9.2f}{n_plain / t_plain:10.0f}")
    for w, t, n in rows:
        print(f"{f'kitsprep build, {w} worker(s)':<38}{t:9.2f}{n / t:10.0f}")
    print(f"{'kitsprep build, 1 worker, --no-fsync':<38}{t_nofsync:9.2f}{n1 / t_nofsync:10.0f}")
    print("\nratios")
    speed = (n1 / t1) / (n_plain / t_plain)
    print(f"  ours(1 worker) / plain, slices/s:      {speed:5.2f}x   (target >= 4)")
    print(f"  ours(1 worker) time / zlib decompress: {t1 / t_zlib:5.2f}x   (target <= 1.3)")
    print(f"  ours(1 worker) time / isal decompress: {t1 / t_isal:5.2f}x")
    for w, t, _ in rows[1:]:
        print(f"  speed-up with {w} workers:              {t1 / t:5.2f}x   (linear: {w}x)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
