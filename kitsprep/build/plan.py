"""Planning a build from the headers alone: each case's slice count, the store's layout
and manifest in `OUT.partial` (or the interrupted build's, checked against this one), and
on --resume which committed cases changed at their source since."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from kitsprep import __version__
from kitsprep.build.config import BuildConfig
from kitsprep.build.finish import JOURNAL
from kitsprep.build.resume import partial_dir, record_fingerprint
from kitsprep.cases import CaseRef, check_pair, read_header, source_fingerprint
from kitsprep.errors import KitsError
from kitsprep.files import write_atomic
from kitsprep.geometry import axial_axes, voxel_spacing
from kitsprep.spacing import Spacing, parse_spacing, resolve_spacing
from kitsprep.store.format import CasePlan
from kitsprep.store.journal import restore_journal
from kitsprep.store.superblock import clear_write_flags
from kitsprep.store.write import create_layout, image_offsets


def plan_cases(refs: list[CaseRef], skip_bad: bool, bad: dict[str, str]) -> list[CasePlan]:
    plans = []
    for ref in refs:
        try:
            img = read_header(ref.imaging, ref.case_id)
            if ref.segmentation is not None:
                check_pair(ref.case_id, img, read_header(ref.segmentation, ref.case_id))
        except KitsError as exc:
            if not skip_bad:
                raise
            bad[ref.case_id] = str(exc)
            continue
        axial = axial_axes(img.affine)[0]
        plans.append(CasePlan(ref.case_id, img.shape[axial], ref.labelled))
    return plans


def build_spacing(cfg: BuildConfig, refs: list[CaseRef]) -> Spacing:
    """`--spacing` resolved over the cases being built (headers only): auto takes the median
    in-plane spacing of those whose header reads (a bad one is named by its own case)."""
    option = parse_spacing(cfg.spacing)  # a BuildConfig made in Python is checked too
    in_plane = []
    if option == "auto":
        for ref in refs:
            try:
                img = read_header(ref.imaging, ref.case_id)
            except KitsError:
                continue
            spacing, axes = voxel_spacing(img.affine), axial_axes(img.affine)
            in_plane.append((spacing[axes[1]], spacing[axes[2]]))
    return resolve_spacing(option, in_plane)


def open_partial_build(
    cfg: BuildConfig, refs: list[CaseRef], bad: dict[str, str], spacing: Spacing
) -> tuple[Path, list[CasePlan], dict[str, np.ndarray]]:
    """Create the partial build, or reopen it for --resume after checking it matches."""
    work = partial_dir(cfg.out)
    manifest_path = work / "manifest.json"
    store = work / "store.h5"
    if work.exists() and cfg.resume and manifest_path.is_file() and store.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise KitsError(
                f"the interrupted build's manifest {manifest_path} is unreadable ({exc}); "
                "start over with --overwrite"
            ) from None
        wanted = [r.case_id for r in refs]
        if manifest["identity"] != cfg.identity() or manifest["selected"] != wanted:
            raise KitsError(
                f"the interrupted build in {work} used other options or cases "
                f"({manifest['identity']}, {len(manifest['selected'])} cases); rerun it with "
                "the same --size/--window/--spacing/--cases, or start over with --overwrite"
            )
        bad.update(manifest["bad"])
        plans = [CasePlan(**p) for p in manifest["plans"]]
        try:
            # a kill or a full disk during the final write: the store as it was before it
            restore_journal(store, work / JOURNAL)
            clear_write_flags(store)  # a kill during finalize left the file "open for write"
            offsets = image_offsets(store)
        except (OSError, KeyError) as exc:  # HDF5 metadata torn by a kill, or a stray edit
            raise KitsError(
                f"the interrupted build in {work} is damaged ({exc}); start over with --overwrite"
            ) from None
        return store, plans, offsets
    if work.exists():
        if not (cfg.overwrite or cfg.resume):
            raise KitsError(
                f"an interrupted build of {cfg.out} is in {work}; continue it with "
                "--resume, or start over with --overwrite"
            )
        shutil.rmtree(work)
    plans = plan_cases(refs, cfg.skip_bad, bad)
    if not plans:
        raise KitsError(f"no usable case in {cfg.src}: " + "; ".join(bad.values()))
    (work / "cases").mkdir(parents=True)
    build_opts = {
        **cfg.identity(),
        "src": str(cfg.src),
        "cases": cfg.cases,
        "skip_bad": cfg.skip_bad,
        "kitsprep_version": __version__,
    }
    offsets = create_layout(store, plans, cfg.size, cfg.window, build_opts, spacing)
    manifest = {
        "identity": cfg.identity(),
        "selected": [r.case_id for r in refs],
        "plans": [asdict(p) for p in plans],
        "bad": bad,
    }
    write_atomic(manifest_path, json.dumps(manifest, indent=1))
    return store, plans, offsets


def check_changed_sources(
    plans: list[CasePlan], by_id: dict[str, CaseRef], record: dict[str, Path]
) -> None:
    """On --resume, a committed case whose source files changed since (a repaired case) is
    redone; any case whose slice count no longer fits the planned layout is refused by
    name, as the layout's space is fixed."""
    for p in plans:
        ref = by_id[p.case_id]
        rec = record[p.case_id]
        if rec.is_file() and record_fingerprint(rec) == _source_fingerprints(ref):
            continue
        if ref.labelled != p.labelled:
            raise KitsError(
                f"{ref.case_id} changed since the interrupted build: its "
                "segmentation was "
                + ("added" if ref.labelled else "removed")
                + "; start over with --overwrite"
            )
        img = read_header(ref.imaging, ref.case_id)
        n = img.shape[axial_axes(img.affine)[0]]
        if n != p.slices:
            raise KitsError(
                f"{ref.case_id} changed since the interrupted build: it now has {n} "
                f"slices, the build planned {p.slices}; start over with --overwrite"
            )
        if rec.is_file():
            rec.unlink()  # redone from its new source


def _source_fingerprints(ref: CaseRef) -> dict:
    fp = {"imaging": source_fingerprint(ref.imaging)}
    if ref.segmentation is not None:
        fp["segmentation"] = source_fingerprint(ref.segmentation)
    return fp
